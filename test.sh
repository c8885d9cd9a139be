#!/usr/bin/env bash
# Install what the tests need (once), lint, and run the tests: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements-dev.txt
ruff check --quiet .
python -m pytest -q "$@" tests/
