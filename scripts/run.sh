#!/usr/bin/env bash
# Set up and run dotmac-communications on its embedded defaults (no Redis, no other services):
# validate the configuration and run the health checks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
.venv/bin/dotmac-comms config check
.venv/bin/dotmac-comms health
