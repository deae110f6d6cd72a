"""The committed generated code matches protos/, and a stale copy is caught."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _gen_protos():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_code_is_fresh() -> None:
    gen = _gen_protos()
    assert gen.stale_files(gen.OUT_ROOT) == [], "run `make proto` and commit the result"


def test_stale_code_is_caught(tmp_path: Path) -> None:
    gen = _gen_protos()
    copy = tmp_path / "src"
    shutil.copytree(gen.OUT_ROOT, copy)
    stub = copy / "emili" / "fer" / "v1" / "fer_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (copy / "emili" / "fer" / "v1" / "fer_pb2_grpc.py").unlink()
    problems = gen.stale_files(copy)
    assert "differs: fer/v1/fer_pb2.pyi" in problems
    assert "missing: fer/v1/fer_pb2_grpc.py" in problems


def _proto_modules() -> list[object]:
    import importlib

    root = ROOT / "libs" / "proto" / "src"
    names = [".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*_pb2.py")]
    assert names, "no generated modules"
    return [importlib.import_module(name) for name in names]


def test_packages_are_versioned_per_service() -> None:
    for module in _proto_modules():
        package = module.DESCRIPTOR.package  # type: ignore[attr-defined]
        parts = package.split(".")
        assert len(parts) == 3 and parts[0] == "emili" and parts[2] == "v1", package


def test_enum_zero_values_are_unspecified() -> None:
    for module in _proto_modules():
        for enum in module.DESCRIPTOR.enum_types_by_name.values():  # type: ignore[attr-defined]
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def test_every_rpc_has_its_own_request_and_response() -> None:
    for module in _proto_modules():
        for service in module.DESCRIPTOR.services_by_name.values():  # type: ignore[attr-defined]
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request"
                assert method.output_type.name == f"{method.name}Response"
