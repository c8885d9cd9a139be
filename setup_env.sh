# Sourced by demo.sh and test.sh: make (once) and activate a virtual environment with what a stage needs.
# DIGIT_VENV picks its place (default ~/.cache/digit/venv); DIGIT_PYTHON the interpreter that makes it;
# DIGIT_INSTALLER=pip installs with pip alone.
set -euo pipefail
VENV="${DIGIT_VENV:-$HOME/.cache/digit/venv}"
REQ="$1"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating a virtual environment in $VENV"
    "${DIGIT_PYTHON:-python3}" -m venv "$VENV"
fi
# uv (what nanochat installs with) puts the same wheels from the same index in place ~2.5x faster than pip,
# because it unpacks them in parallel: requirements.txt (torch and its CUDA libraries, ~5.5 GB) in ~50 s
# against ~125 s on 2 cores (docs/DEMO_TIMES.md). pip installs uv itself; should uv fail (say, an index
# only pip is configured for), pip installs everything instead.
install() {
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if [ "${DIGIT_INSTALLER:-uv}" != pip ]; then
        "${pip[@]}" uv && "$VENV/bin/python" -m uv pip install -q --compile-bytecode --python "$VENV/bin/python" \
            -r "$REQ" && return
        echo "uv could not install $(basename "$REQ"); pip instead"
    fi
    "${pip[@]}" -r "$REQ"
}
# the stamp skips the installer when the requirement files have not changed since it last ran
STAMP="$VENV/.digit-$(cat "$(dirname "$REQ")"/requirements*.txt | cksum | cut -d' ' -f1)-$(basename "$REQ")"
if [ ! -f "$STAMP" ]; then
    echo "installing $(basename "$REQ") into $VENV (the first time takes a minute or two)"
    install
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
