# Sourced by demo.sh and test.sh: make (once) and activate a virtual environment with what a stage needs.
# DIGIT_VENV picks its place (default ~/.cache/digit/venv); DIGIT_PYTHON the interpreter that makes it.
set -euo pipefail
VENV="${DIGIT_VENV:-$HOME/.cache/digit/venv}"
REQ="$1"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating a virtual environment in $VENV"
    "${DIGIT_PYTHON:-python3}" -m venv "$VENV"
fi
# pip is quick when everything is already installed; the stamp skips even that when nothing changed
STAMP="$VENV/.digit-$(cat "$(dirname "$REQ")"/requirements*.txt | cksum | cut -d' ' -f1)-$(basename "$REQ")"
if [ ! -f "$STAMP" ]; then
    echo "installing $(basename "$REQ") into $VENV (the first time takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
