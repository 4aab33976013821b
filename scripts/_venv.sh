# Sourced by run.sh and test.sh: create .venv (Python >= 3.11) and install the project into it.
# Usage: . scripts/_venv.sh [EXTRAS]   e.g. ". scripts/_venv.sh dev"
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "dotmac-communications needs Python >= 3.11 (found $("$PYTHON" --version 2>&1))" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
spec="."
if [ -n "${1:-}" ]; then spec=".[$1]"; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --editable "$spec"
