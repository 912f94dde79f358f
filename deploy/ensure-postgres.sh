#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 and that the user `postgres` can log
# in there with the password `postgres` (or with trust auth). Starts the local cluster where it
# is installed but stopped; installs it from Debian's packages where it is missing.
set -euo pipefail

host=127.0.0.1
port=5432

say() { printf 'ensure-postgres: %s\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

listening() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

can_login() {
  PGPASSWORD=postgres psql "postgresql://postgres@$host:$port/postgres" -tAc 'select 1' >/dev/null 2>&1
}

wait_listening() {
  for _ in $(seq 1 60); do
    listening && return 0
    sleep 0.5
  done
  return 1
}

start_clusters() {
  command -v pg_lsclusters >/dev/null || return 1
  local started=1
  while read -r version name _; do
    [[ -n $version ]] || continue
    say "starting cluster $version/$name"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start || true
    started=0
  done < <(pg_lsclusters --no-header 2>/dev/null)
  return $started
}

if ! listening; then
  if ! start_clusters; then
    say "PostgreSQL is not installed: installing it from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    start_clusters || { say "no PostgreSQL cluster to start"; exit 1; }
  fi
  wait_listening || { say "PostgreSQL did not start listening on $host:$port"; exit 1; }
fi

if ! can_login; then
  say "setting the password of user postgres"
  as_postgres psql -qc "alter user postgres password 'postgres'" >/dev/null
  can_login || { say "cannot log in as postgres on $host:$port"; exit 1; }
fi
say "PostgreSQL is ready on $host:$port"
