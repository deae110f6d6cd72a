"""Each service's declared dependencies cover what its server, worker and tasks import when they load.

An image installs a service with its declared dependencies only, while this virtual environment holds every
package of the workspace, so an import the pyproject forgets works here and fails in production. For each
service a fresh interpreter installs an import guard (a meta path finder in front of all others) that lets
through only the standard library and the top-level modules of the distributions the service declares,
transitively (this repository's pyproject files, then ``importlib.metadata``); anything else looks uninstalled.
It then imports the service's entry modules and reports every blocked module an EMILI module asked for.
Third-party packages asking for their optional extras are not reported: they see them missing, as they would
in the image.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.parent.name for p in ROOT.glob("services/*/pyproject.toml"))
ENTRY_MODULES = ("main", "worker", "tasks", "pipeline_steps")  # Server, worker, tasks, and the pipeline's steps.

# Runs in a fresh interpreter that has imported only the standard library: input (JSON on stdin) the allowed
# top-level modules and the modules to import; output (JSON) blocked modules with the EMILI modules that asked.
GUARD = textwrap.dedent(
    """
    import importlib, json, sys, sysconfig, traceback

    config = json.loads(sys.stdin.read())
    loaded = {name.partition(".")[0] for name in sys.modules}  # Interpreter start-up (site, .pth files).
    allowed = frozenset(config["allowed"]) | sys.stdlib_module_names | loaded
    # Private standard modules (_sysconfigdata_*) are not in stdlib_module_names: allowed by where they live.
    stdlib = tuple(sysconfig.get_path(key) for key in ("stdlib", "platstdlib"))
    blocked = {}

    def first_party(module):
        top = module.partition(".")[0]
        return top == "emili" or top.startswith("emili_")

    def in_stdlib(origin):
        return bool(origin) and origin.startswith(stdlib) and "site-packages" not in origin

    def importer():
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__") or ""
            frozen = frame.f_code.co_filename.startswith("<frozen")
            if not (frozen or name == "importlib" or name.startswith("importlib.") or frame.f_globals is globals()):
                return name
            frame = frame.f_back
        return "<guard>"

    class Guard:
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            spec = None
            for finder in self.finders:
                find = getattr(finder, "find_spec", None)
                spec = find(name, path, target) if find is not None else None
                if spec is not None:
                    break
            top = name.partition(".")[0]
            if top in allowed or spec is None or in_stdlib(spec.origin):
                return spec
            asker = importer()
            if first_party(asker):
                blocked.setdefault(top, set()).add(asker)
            return None  # The module looks uninstalled.

        def find_distributions(self, *args, **kwargs):
            # importlib.metadata asks the meta path for distributions; metadata stays visible.
            for finder in self.finders:
                if hasattr(finder, "find_distributions"):
                    yield from finder.find_distributions(*args, **kwargs)

        def invalidate_caches(self):
            for finder in self.finders:
                if hasattr(finder, "invalidate_caches"):
                    finder.invalidate_caches()

    sys.meta_path[:] = [Guard(list(sys.meta_path))]
    errors = []
    for module in config["modules"]:
        try:
            importlib.import_module(module)
        except BaseException as exc:
            errors.append(f"{module}: {type(exc).__name__}: {exc}\\n{traceback.format_exc(limit=-4)}")
    print(json.dumps({"blocked": {k: sorted(v) for k, v in blocked.items()}, "errors": errors}))
    """
)


@dataclass(frozen=True)
class WorkspacePackage:
    requires: tuple[str, ...]  # As requirement strings, optional dependencies with their extra's marker.
    modules: frozenset[str]  # Its top-level modules (under src/).


@functools.cache
def workspace() -> dict[str, WorkspacePackage]:
    """The packages of this repository, read from their pyproject.toml: the source of truth, which the installed
    metadata only catches up with at the next ``make setup``."""
    packages = {}
    for pyproject in sorted([*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]):
        project = tomllib.loads(pyproject.read_text())["project"]
        requires = list(project.get("dependencies", []))
        for extra, lines in project.get("optional-dependencies", {}).items():
            requires += [f"{line}; extra == '{extra}'" for line in lines]
        src = pyproject.parent / "src"
        modules = frozenset(p.parent.name for p in src.glob("*/__init__.py"))
        packages[canonicalize_name(project["name"])] = WorkspacePackage(tuple(requires), modules)
    return packages


def requirement_closure(distribution: str) -> set[str]:
    """The distribution and everything it requires, transitively (markers evaluated, extras followed)."""
    names: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(distribution, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in visited:
            continue
        visited.add((key, extras))
        names.add(key)
        if key in workspace():
            requires: list[str] = list(workspace()[key].requires)
        else:
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue  # Not installed here: the import itself will fail and say so.
        for line in requires:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
                todo.append((req.name, frozenset(req.extras)))
    return names


def allowed_modules(distributions: Iterable[str]) -> set[str]:
    """The top-level modules those distributions install."""
    wanted = {canonicalize_name(d) for d in distributions}
    modules = {m for name in wanted & workspace().keys() for m in workspace()[name].modules}
    return modules | {
        module
        for module, owners in metadata.packages_distributions().items()
        if any(canonicalize_name(owner) in wanted - workspace().keys() for owner in owners)
    }


def guarded_import(
    modules: Iterable[str], allowed: Iterable[str], extra_path: Path | None = None
) -> dict[str, dict[str, list[str]] | list[str]]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", GUARD],
        input=json.dumps({"allowed": sorted(allowed), "modules": list(modules)}),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outcome: dict[str, dict[str, list[str]] | list[str]] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def _entry_modules(service: str) -> list[str]:
    package = ROOT / "services" / service / "src" / f"emili_{service}"
    return [f"emili_{service}.{m}" for m in ENTRY_MODULES if (package / f"{m}.py").is_file()]


@pytest.mark.parametrize("service", SERVICES)
def test_declared_dependencies_cover_what_the_service_imports(service: str) -> None:
    closure = requirement_closure(f"emili-{service}")
    outcome = guarded_import(_entry_modules(service), allowed_modules(closure))
    owners = metadata.packages_distributions()
    undeclared = {
        module: f"from {', '.join(sorted(set(owners.get(module, ['?']))))}, imported by {', '.join(importers)}"
        for module, importers in dict(outcome["blocked"]).items()
    }
    assert not undeclared, f"emili-{service} imports modules of distributions it does not declare: {undeclared}"
    assert not outcome["errors"], "\n".join(outcome["errors"])


def test_the_guard_reports_an_undeclared_import(tmp_path: Path) -> None:
    """A fake service that imports PyYAML without declaring it is caught; a third-party package whose optional
    import is blocked sees it missing and is not reported."""
    (tmp_path / "emili_fake").mkdir()
    (tmp_path / "emili_fake" / "__init__.py").write_text("import json\n")
    (tmp_path / "emili_fake" / "optional.py").write_text("import thirdparty\n\nassert thirdparty.yaml is None\n")
    (tmp_path / "emili_fake" / "tasks.py").write_text("import yaml\n")
    (tmp_path / "thirdparty").mkdir()
    (tmp_path / "thirdparty" / "__init__.py").write_text(
        "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
    )
    allowed = {"emili_fake", "thirdparty"}

    clean = guarded_import(["emili_fake", "emili_fake.optional"], allowed, extra_path=tmp_path)
    assert clean == {"blocked": {}, "errors": []}

    caught = guarded_import(["emili_fake", "emili_fake.tasks"], allowed, extra_path=tmp_path)
    assert caught["blocked"] == {"yaml": ["emili_fake.tasks"]}
    assert any("No module named 'yaml'" in e for e in caught["errors"])

    declared = guarded_import(["emili_fake.tasks"], allowed | allowed_modules(["PyYAML"]), extra_path=tmp_path)
    assert declared == {"blocked": {}, "errors": []}


def test_the_closure_follows_requirements_transitively() -> None:
    closure = requirement_closure("emili-pipeline")
    assert {"emili-pipeline", "emili-core", "pyyaml", "celery", "kombu"} <= closure
    assert "emili-trainer" not in closure and "trl" not in closure
    assert {"yaml", "emili_core", "celery"} <= allowed_modules(closure)
