#!/usr/bin/env bash
# One-time (and repeatable) set-up of a fresh Debian/Ubuntu machine: system packages, .venv, model artefacts.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: Python 3.11+ is required (set PYTHON=...)" >&2; exit 1; }

# System packages: Redis for the local stack and tests, Prometheus for the local stack's monitoring (its promtool
# checks and unit-tests the alerting rules), Chromium and its driver for the participant app's browser tests. Each is
# installed with apt only when its command is missing.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a system-wide Redis on 6379 and Prometheus on 9090; the local stack runs its own.
  ($sudo_cmd service redis-server stop >/dev/null 2>&1 || true)
  ($sudo_cmd service prometheus stop >/dev/null 2>&1 || true)
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel
echo "setup: installing Python packages into .venv"
"${pip[@]}" install -c requirements/constraints.txt \
  -r requirements/runtime.txt -r requirements/dev.txt \
  -e libs/proto -e libs/core -e libs/session -e libs/affect -e libs/llm -e testing -e libs/pipeline \
  -e services/fer -e services/chat -e services/gateway -e services/labeler -e services/trainer

echo "setup: fetching model artefacts into var/artifacts"
.venv/bin/python scripts/fetch_artifacts.py

[ -f .env ] || cp .env.example .env
touch .venv/.setup-stamp
echo "setup: done"
