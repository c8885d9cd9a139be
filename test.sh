#!/usr/bin/env bash
# Install what the tests need (once) and run them: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements-dev.txt
python -m pytest -q "$@" tests/
