#!/usr/bin/env bash
# The compose demo in one command: builds the images here (deploy/image/build.sh, from the
# release binaries), starts deploy/compose.yaml with podman-compose and waits until every
# container is healthy. Stop it with deploy/compose-down.sh (or `podman-compose -f
# deploy/compose.yaml down -v` after `. deploy/podman/env.sh`).
#
# Environment: what deploy/compose.yaml reads (SAGAD_PORT_1, SAGAD_PORT_2, SAGAD_HTTP_PORT_1,
# SAGAD_HTTP_PORT_2, SAGAD_IMAGE, SAGAD_POSTGRES_IMAGE), SAGAD_SKIP_BUILD=1 to use the images
# as they are, and CARGO_TARGET_DIR as cargo reads it. Runs as root (rootful podman).
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${CARGO_TARGET_DIR:-target}/deploy-tools
log=${CARGO_TARGET_DIR:-target}/deploy-compose-up.log
project=sagad
say() { printf 'compose-up: %s\n' "$*"; }

deploy/ensure-podman.sh
deploy/ensure-tools.sh
# shellcheck source=SCRIPTDIR/podman/env.sh
. deploy/podman/env.sh
compose=("$tools/venv/bin/podman-compose" -f deploy/compose.yaml)

[[ ${SAGAD_SKIP_BUILD:-} == 1 ]] || deploy/image/build.sh

# PostgreSQL first, which makes the network's bridge; then the bridge's MAC address is pinned
# before the others join. netavark 1.4 (Debian 12's) leaves the kernel to give the bridge the
# lowest MAC among its ports, which changes as containers join, and a container that learned
# the old one reaches neither the gateway (DNS, the replies of published ports) nor the host
# until its ARP entry expires: the participants' database lookups stalled 30 to 100 s.
# netavark 1.9 pins it itself.
: >"$log"
"${compose[@]}" up -d postgres >>"$log" 2>&1 || {
  cat "$log" >&2
  exit 1
}
bridge=$(podman network inspect "${project}_default" --format '{{.NetworkInterface}}')
ip link set dev "$bridge" address "$(cat "/sys/class/net/$bridge/address")"
"${compose[@]}" up -d >>"$log" 2>&1 || {
  cat "$log" >&2
  exit 1
}

# No systemd here to run podman's health checks on a timer: each is run by hand until it
# passes (podman logs "unable to get systemd connection to add healthchecks" at each start).
mapfile -t containers < <(podman ps -a --filter "label=io.podman.compose.project=$project" \
  --format '{{.Names}}')
deadline=$((SECONDS + ${SAGAD_HEALTH_WAIT:-120}))
waiting=("${containers[@]}")
while ((${#waiting[@]} > 0)); do
  still=()
  for name in "${waiting[@]}"; do
    podman healthcheck run "$name" >/dev/null 2>&1 || still+=("$name")
  done
  waiting=("${still[@]+"${still[@]}"}")
  ((${#waiting[@]} == 0)) && break
  if ((SECONDS >= deadline)); then
    say "not healthy in time: ${waiting[*]} (podman logs NAME; podman-compose output: $log)" >&2
    exit 1
  fi
  sleep 1
done
say "healthy: ${containers[*]}"
sagactl=${CARGO_TARGET_DIR:-target}/release/sagactl
cat <<EOF
compose-up: sagad replica 1 on 127.0.0.1:${SAGAD_PORT_1:-50051} (metrics :${SAGAD_HTTP_PORT_1:-9464}), replica 2 on 127.0.0.1:${SAGAD_PORT_2:-50052} (metrics :${SAGAD_HTTP_PORT_2:-9465}):
  $sagactl --server http://127.0.0.1:${SAGAD_PORT_1:-50051} start order_fulfillment --wait \\
    --input '{"customer_id":"dave","amount_cents":1250,"currency":"EUR","country":"DE"}'
  $sagactl --server http://127.0.0.1:${SAGAD_PORT_2:-50052} list
Stop and remove it all: deploy/compose-down.sh
EOF
