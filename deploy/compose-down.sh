#!/usr/bin/env bash
# Stops and removes what deploy/compose-up.sh started: the containers, their network and the
# database's volume.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${CARGO_TARGET_DIR:-target}/deploy-tools
# shellcheck source=SCRIPTDIR/podman/env.sh
. deploy/podman/env.sh
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
status=0
"$tools/venv/bin/podman-compose" -f deploy/compose.yaml down -v >/dev/null 2>"$errors" || status=$?
# Without systemd, podman says for each container that it has no health check timer to remove;
# with nothing up, that each container and the pod are not there.
if ((status != 0)); then
  cat "$errors" >&2
else
  grep -v -e 'unable to get systemd connection to remove healthchecks' \
    -e 'no container with name or ID' -e 'no pod with name or ID' "$errors" >&2 || true
fi
exit "$status"
