#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, lints, the offline query data, unit
# and property tests, and the integration and end-to-end tests against a real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/ensure-postgres.sh
# The metrics tests lint sagad's page with promtool.
scripts/ensure-promtool.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if command -v cargo-sqlx >/dev/null; then
  # The committed .sqlx/ must match the queries (this needs the database).
  DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/sagad_sqlx_check \
    cargo sqlx database setup --source migrations/orchestrator >/dev/null
  DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/sagad_sqlx_check \
    cargo sqlx prepare --workspace --check
fi
# The end-to-end tests run the binaries, so build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked
