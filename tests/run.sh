#!/usr/bin/env bash
# Sets up everything the test suite drives and runs it:
#   a virtualenv with the package and its test and bench extras, React for one browser
#   test, and the real programs the tests start (redis-server, curl, nginx, chromium, npm),
#   installed with apt-get when missing; then lint (ruff), types (mypy) and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)
command -v nginx >/dev/null || missing+=(nginx)
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v pgrep >/dev/null || missing+=(procps)
command -v systemd-analyze >/dev/null || missing+=(systemd)  # checks the shipped unit
if ((${#missing[@]})); then
  echo "installing system packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"

# React and TypeScript, for the browser test of the guide's hook and the streamer.js types.
npm ci --prefix tests/js --no-audit --no-fund --loglevel=error

.venv/bin/ruff check streamer tests bench deploy
.venv/bin/ruff format --check streamer tests bench deploy
.venv/bin/mypy streamer

exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
