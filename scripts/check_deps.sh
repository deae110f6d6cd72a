#!/usr/bin/env bash
# deptry once per package, in its own folder, so each package's pyproject is checked against what its src/
# imports: nothing missing, nothing unused, nothing used only through another package's dependencies.
# Usage: scripts/check_deps.sh [PACKAGE_DIR...]   (default: every package; `make lint` runs it)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPTRY="${DEPTRY:-$ROOT/.venv/bin/deptry}"
if [ "$#" -gt 0 ]; then
  packages=("$@")
else
  packages=()
  for pyproject in "$ROOT"/libs/*/pyproject.toml "$ROOT"/services/*/pyproject.toml "$ROOT"/testing/pyproject.toml; do
    packages+=("$(dirname "${pyproject#"$ROOT"/}")")
  done
fi

failed=()
for package in "${packages[@]}"; do
  echo "deptry: $package"
  (cd "$ROOT/$package" && "$DEPTRY" src --no-ansi) || failed+=("$package")
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "dependency declarations to fix in: ${failed[*]}" >&2
  exit 1
fi
