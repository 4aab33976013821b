#!/usr/bin/env bash
# Set up and run dotmac-communications on its embedded defaults (no Redis, no other services):
# validate the configuration, then run the WebSocket gateway with /health and /metrics until
# Ctrl-C (SIGINT) or SIGTERM. Without DOTMAC_WEBSOCKETS__JWT_SECRET it runs in a loudly logged
# development mode that accepts anonymous clients.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
.venv/bin/dotmac-comms config check
exec .venv/bin/dotmac-comms serve "$@"
