#!/usr/bin/env bash
# The whole demo: builds, makes sure PostgreSQL runs, starts the three demo participants and
# sagad, runs three orders (one completes, one is refused for funds, one for its destination),
# prints how each ended and what was undone, and keeps everything running until Ctrl-C (or
# SIGTERM), which stops all four processes gracefully.
#
# Environment: DATABASE_URL (sagad's database), ORDER_DATABASE_URL, PAYMENT_DATABASE_URL,
# SHIPPING_DATABASE_URL (the participants'), DEMO_LOG_DIR (default target/demo-logs), and
# CARGO_TARGET_DIR as cargo reads it.
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."

server=postgres://postgres:postgres@127.0.0.1:5432
sagad_db=${DATABASE_URL:-$server/sagad}
order_db=${ORDER_DATABASE_URL:-$server/sagad_order}
payment_db=${PAYMENT_DATABASE_URL:-$server/sagad_payment}
shipping_db=${SHIPPING_DATABASE_URL:-$server/sagad_shipping}
target=${CARGO_TARGET_DIR:-target}
logs=${DEMO_LOG_DIR:-$target/demo-logs}
bin=$target/release
sagactl=$bin/sagactl
# How long a process may take to start serving, and to stop after SIGTERM (sagad finishes the
# calls in flight for up to its 10 s shutdown grace).
start_wait_s=60
stop_wait_s=20

# Output may go to a pipe whose reader is gone (`run.sh | tee demo.log`, then Ctrl-C stops tee
# too): a write that fails must neither kill the script (SIGPIPE, ignored once the services
# run) nor stop it (set -e), or the services, each in a session of its own, would outlive it.
say() { printf '%s\n' "$*" 2>/dev/null || true; }
fail() {
  printf 'run.sh: %s\n' "$*" >&2 2>/dev/null || true
  exit 1
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The processes started, in start order, by pid.
pids=()
names=()

# Stops every process still running, newest first (sagad before the participants it calls):
# SIGTERM to its process group (each leads one, being started with setsid), then wait; one that
# outlives the wait is killed. Reports how each ended.
stop_all() {
  local i pid name status
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    name=${names[i]}
    if ! kill -0 "$pid" 2>/dev/null; then
      status=0
      wait "$pid" 2>/dev/null || status=$?
      say "  $name had already stopped (exit $status)"
      continue
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((tick = 0; tick < stop_wait_s * 10; tick++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "  $name did not stop within ${stop_wait_s}s: killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    status=0
    wait "$pid" 2>/dev/null || status=$?
    say "  $name stopped (exit $status)"
  done
  pids=()
  names=()
}

# A second Ctrl-C is ignored: the stop is bounded, and leaving now would orphan the processes.
# So is SIGPIPE: the terminal's Ctrl-C also stopped whatever reads our output.
on_signal() {
  trap '' INT TERM HUP PIPE
  say ""
  say "Stopping (logs stay in $logs/):"
  stop_all
  exit 0
}

on_exit() {
  local status=$?
  trap '' INT TERM HUP PIPE
  if ((${#pids[@]} > 0)); then
    say "Stopping what was started:"
    stop_all
  fi
  exit "$status"
}

trap on_signal INT TERM HUP
trap on_exit EXIT

# The last lines of a process's log, to show why it stopped.
show_log() {
  {
    say "--- last lines of $logs/$1.log:"
    tail -n 20 "$logs/$1.log" || true
    say "---"
  } >&2
}

# start NAME ARGS...: runs the binary NAME in a session of its own (so a Ctrl-C in the
# terminal reaches only this script, which stops the processes in order), its output to
# $logs/NAME.log. From the first start on, a write to a closed output no longer kills the
# script (see say).
start() {
  trap '' PIPE
  local name=$1
  shift
  setsid "$bin/$name" "$@" >"$logs/$name.log" 2>&1 </dev/null &
  pids+=("$!")
  names+=("$name")
}

# wait_ready NAME CHECK...: waits until the command CHECK succeeds, failing if NAME stops
# first or does not get there in time.
wait_ready() {
  local name=$1 pid=${pids[-1]}
  shift
  for ((tick = 0; tick < start_wait_s * 10; tick++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_log "$name"
      fail "$name stopped while starting"
    fi
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  show_log "$name"
  fail "$name did not start serving within ${start_wait_s}s"
}

participant_serving() { grep -q "participant is serving" "$logs/$1.log"; }

deploy/ensure-postgres.sh
cargo build --release --workspace --bins --locked

for port in 50051 50061 50062 50063 9464; do
  if listening "$port"; then
    fail "port $port on 127.0.0.1 is already in use (a demo still running?): stop that process first"
  fi
done

mkdir -p "$logs"
say ""
say "Logs: $logs/{order-service,payment-service,shipping-service,sagad}.log"
say "  (follow them with: tail -f $logs/*.log)"

start order-service --database-url "$order_db" --listen 127.0.0.1:50061
wait_ready order-service participant_serving order-service
start payment-service --database-url "$payment_db" --listen 127.0.0.1:50062
wait_ready payment-service participant_serving payment-service
start shipping-service --database-url "$shipping_db" --listen 127.0.0.1:50063
wait_ready shipping-service participant_serving shipping-service
start sagad --database-url "$sagad_db" --defs saga-defs \
  --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 \
  --participant order=http://127.0.0.1:50061 \
  --participant payment=http://127.0.0.1:50062 \
  --participant shipping=http://127.0.0.1:50063
wait_ready sagad "$sagactl" list --limit 1
say "Running: order-service :50061, payment-service :50062, shipping-service :50063,"
say "         sagad :50051 (explorer http://127.0.0.1:9464/, metrics http://127.0.0.1:9464/metrics)"

# Customers new to this run: account balances persist from one run to the next.
run_id=$(date +%Y%m%d-%H%M%S)

# demo NUMBER TITLE EXPECTED STORY INPUT: starts one saga, waits for it to end, prints it.
demo() {
  local number=$1 title=$2 expected=$3 story=$4 input=$5 shown status code
  say ""
  say "=== $number. $title"
  say "    expected: $expected: $story"
  say ""
  # sagactl start --wait exits 0 for COMPLETED, 3 for COMPENSATED, 4 for FAILED.
  code=0
  shown=$("$sagactl" start order_fulfillment --input "$input" --wait --timeout 60s) || code=$?
  if ((code != 0 && code != 3 && code != 4)); then
    say "!!! this saga could not be run or did not end: see the message above and $logs/"
    return 0
  fi
  say "$shown" | sed '/./s/^/    /'
  status=$(awk '$1 == "status" { print $2; exit }' <<<"$shown")
  say ""
  if [[ $status == "$expected" ]]; then
    say "    => $status, as expected"
  else
    say "    => $status, NOT the expected $expected: see $logs/"
  fi
}

say ""
say "Three orders:"
demo 1 "An order that goes through" COMPLETED \
  "the order is created, 49.99 EUR charged, the parcel scheduled for Sweden, the order approved" \
  "{\"customer_id\":\"alice-$run_id\",\"amount_cents\":4999,\"currency\":\"EUR\",\"country\":\"SE\",\"items\":[{\"sku\":\"book-42\",\"quantity\":1}]}"
demo 2 "An order the customer cannot pay" COMPENSATED \
  "1500.00 EUR is more than the 1000.00 EUR account balance: payment refuses (INSUFFICIENT_FUNDS), so the order is cancelled" \
  "{\"customer_id\":\"bob-$run_id\",\"amount_cents\":150000,\"currency\":\"EUR\",\"country\":\"FR\",\"items\":[{\"sku\":\"sofa-7\",\"quantity\":1}]}"
demo 3 "An order for a place nobody ships to" COMPENSATED \
  "shipping refuses Antarctica (UNSUPPORTED_DESTINATION), so the 25.00 EUR charge is refunded, then the order cancelled" \
  "{\"customer_id\":\"carol-$run_id\",\"amount_cents\":2500,\"currency\":\"EUR\",\"country\":\"AQ\",\"items\":[{\"sku\":\"parka-1\",\"quantity\":1}]}"

# The commands below, as the caller can paste them from where they ran this script.
shown_sagactl=$sagactl
if [[ $sagactl != /* && $caller_dir != "$PWD" ]]; then
  shown_sagactl=$PWD/$sagactl
fi

cat <<EOF

The system keeps running. Start more sagas (every account starts with 1000.00 EUR; shipping
refuses country AQ), then look at them:

  $shown_sagactl start order_fulfillment --wait \\
      --input '{"customer_id":"dave","amount_cents":1250,"currency":"EUR","country":"DE","items":[{"sku":"mug-3","quantity":2}]}'
  $shown_sagactl list
  $shown_sagactl get SAGA_ID
  $shown_sagactl watch SAGA_ID      # its events as they come, until it ends
  $shown_sagactl list --stuck       # sagas whose current step keeps failing

Or open the explorer in a browser: http://127.0.0.1:9464/ (every saga, live, with its
diagram, timeline, and Cancel and Retry).

Logs: tail -f $logs/*.log. Press Ctrl-C to stop everything.
EOF

# Until a signal arrives (the trap stops everything and exits 0), or a process stops by itself.
status=0
wait -n -p ended "${pids[@]}" || status=$?
for i in "${!pids[@]}"; do
  if [[ ${pids[i]} == "${ended:-}" ]]; then
    printf '\nrun.sh: %s stopped by itself (exit %s)\n' "${names[i]}" "$status" >&2
    show_log "${names[i]}"
    unset 'pids[i]' 'names[i]'
  fi
done
pids=("${pids[@]}")
names=("${names[@]}")
exit 1
