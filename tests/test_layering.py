"""One-way layering, checked by import-linter with the contracts in the root pyproject.toml: libraries never
import a service, and services never import each other (they talk over gRPC and queues).

The second test proves the check has teeth: the same contracts, run over a copy of the packages in which a
library imports a service (or a service another service), must fail and name the broken contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONFIG = ROOT / "pyproject.toml"


def _lint_imports(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_repository_keeps_its_layering_contracts() -> None:
    result = _lint_imports(cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def _contract_names() -> dict[str, str]:
    contracts = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]["contracts"]
    return {c["id"]: c["name"] for c in contracts}


@pytest.mark.parametrize(
    ("module", "imports", "contract"),
    [
        ("emili_pipeline/steps.py", "from emili_trainer import recipes", "libraries-import-no-service"),
        ("emili_core/helpers.py", "import emili_chat", "libraries-import-no-service"),
        ("emili_trainer/jobs.py", "from emili_labeler import datasets", "services-independent"),
    ],
)
def test_a_violation_breaks_its_contract(tmp_path: Path, module: str, imports: str, contract: str) -> None:
    """A shadow copy of every root package, found first on PYTHONPATH, with one forbidden import in it."""
    packages = tmp_path / "packages"
    for name in tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]["root_packages"]:
        (packages / name).mkdir(parents=True)
        (packages / name / "__init__.py").write_text("")
    (packages / module).write_text(f"{imports}\n")
    (tmp_path / "pyproject.toml").write_text(CONFIG.read_text())  # The contracts as they are, run elsewhere.

    result = _lint_imports("pyproject.toml", cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(packages)})
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert broken == [f"{_contract_names()[contract]} BROKEN"], result.stdout + result.stderr


def test_the_contracts_name_every_package() -> None:
    """A new library or service must join the contracts, or import-linter would not look at it."""
    config = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    libraries = {p.parent.name for p in ROOT.glob("libs/*/src/*/__init__.py")}
    services = {p.parent.name for p in ROOT.glob("services/*/src/*/__init__.py")}
    assert set(config["root_packages"]) == libraries | services
    assert set(contracts["libraries-import-no-service"]["source_modules"]) == libraries
    assert set(contracts["libraries-import-no-service"]["forbidden_modules"]) == services
    assert set(contracts["services-independent"]["modules"]) == services
