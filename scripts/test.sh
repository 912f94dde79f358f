#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, lints, the offline query data, unit
# and property tests, and the integration and end-to-end tests against a real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/ensure-postgres.sh
# The metrics tests lint sagad's page with promtool.
scripts/ensure-promtool.sh
# The explorer's browser tests drive Debian's headless Chromium.
scripts/ensure-chromium.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The committed .sqlx/ must match the queries (this needs the database), so the check always
# runs: sqlx-cli is installed here when missing.
if ! command -v cargo-sqlx >/dev/null; then
  cargo install sqlx-cli --version 0.9.0 --no-default-features --features postgres,rustls --locked
fi
DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/sagad_sqlx_check \
  cargo sqlx database setup --source migrations/orchestrator >/dev/null
DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/sagad_sqlx_check \
  cargo sqlx prepare --workspace --check
# The end-to-end tests run the binaries, so build them first.
cargo build --workspace --bins --locked
# The explorer's render times over 10,000 sagas are printed, never judged: that test runs on its
# own with its output shown.
cargo test --workspace --locked -- --skip pages_over_ten_thousand_sagas_print_their_render_times
cargo test -p sagad-e2e --locked --test explorer pages_over_ten_thousand_sagas_print_their_render_times \
  -- --nocapture
# The benchmark's harness at a small size, on the debug build: it must work; its figures are
# printed, never judged.
BENCH_PROFILE=debug bench/run.sh --small --json target/bench/ci.json
# deploy/: the images built here, the compose demo run, the Kubernetes and systemd files checked.
DEPLOY_PROFILE=debug deploy/test.sh
