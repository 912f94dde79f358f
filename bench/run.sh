#!/usr/bin/env bash
# The benchmark behind BENCHMARKS.md, in one command. Builds the release binaries, then starts
# a private Postgres cluster (fsync and synchronous commit on), measures pgbench's yardstick on
# it, starts the three demo participants and sagad on it, runs order_fulfillment through
# `sagactl bench` at 1, 16 and 64 clients (a tenth of the sagas refused by shipping, so
# compensation is measured), grows the database (finished sagas, sagas waiting an hour) and
# runs 64 clients again. Prints a table and writes target/bench/latest.json.
#
#   bench/run.sh            # the full run (about ten minutes on two cores)
#   bench/run.sh --small    # a few hundred sagas: what CI runs to prove the harness works
#   bench/run.sh --help     # every option
#
# BENCH_PROFILE=debug runs the debug build instead (CI does, with --small, to prove the harness
# works without a second build; its figures say nothing of sagad's speed).
#
# Needs Debian's postgresql package (initdb, pg_ctl, pgbench); deploy/ensure-postgres.sh
# installs it where missing. Nothing is asserted: the figures are for reading.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/ensure-postgres.sh >/dev/null
target=${CARGO_TARGET_DIR:-target}
case ${BENCH_PROFILE:-release} in
  release) cargo build --release --locked --workspace --bins; bin=$target/release ;;
  debug) cargo build --locked --workspace --bins; bin=$target/debug ;;
  *) echo "run.sh: BENCH_PROFILE must be release or debug" >&2; exit 2 ;;
esac
SAGAD_BIN_DIR=$bin exec "$bin/sagad-bench" "$@"
