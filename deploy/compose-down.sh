#!/usr/bin/env bash
# Stops and removes what deploy/compose-up.sh started: the containers, their network and the
# database's volume.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${CARGO_TARGET_DIR:-target}/deploy-tools
# shellcheck source=SCRIPTDIR/podman/env.sh
. deploy/podman/env.sh
"$tools/venv/bin/podman-compose" -f deploy/compose.yaml down -v >/dev/null
