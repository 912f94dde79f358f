#!/bin/sh
# The postgres image's entrypoint: makes the cluster on the first start (user postgres with
# the password $POSTGRES_PASSWORD, password logins from any address), then runs the server in
# the foreground with any arguments given (`-c name=value`).
set -eu

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: set POSTGRES_PASSWORD, the password of user postgres" >&2
    exit 2
  fi
  # The password reaches initdb on a pipe: no file holds it (and there is no rm to delete one).
  if ! output=$(printf '%s\n' "$POSTGRES_PASSWORD" | initdb --pgdata="$PGDATA" \
    --username=postgres --pwfile=/dev/stdin --encoding=UTF8 --locale=C \
    --auth-local=trust --auth-host=scram-sha-256 2>&1); then
    printf '%s\n' "$output" >&2
    exit 1
  fi
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "postgres-entrypoint: made the cluster in $PGDATA"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
