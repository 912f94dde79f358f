#!/usr/bin/env bash
# Runs sagad against the local PostgreSQL with the demo saga definitions. Flags given to this
# script are passed on to sagad (for example --participant NAME=URI to override an address).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/ensure-postgres.sh
cargo build --release --workspace --bins

export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/sagad}
export SAGAD_PARTICIPANTS=${SAGAD_PARTICIPANTS:-order=http://127.0.0.1:50061,payment=http://127.0.0.1:50062,shipping=http://127.0.0.1:50063}
exec target/release/sagad --defs saga-defs "$@"
