#!/usr/bin/env bash
# Builds the two images of the compose demo HERE, with no registry and no base image, and
# prints their sizes:
#   localhost/sagad:local           sagad, sagactl, order-service, payment-service and
#                                   shipping-service, the shared libraries they link (by ldd),
#                                   CA certificates, /etc/passwd with user sagad (10001),
#                                   saga-defs/ in /etc/sagad/saga-defs; no shell
#   localhost/sagad-postgres:local  this machine's Debian PostgreSQL server, run as user
#                                   postgres (999)
# Each is `FROM scratch` plus a root filesystem laid out here under
# $CARGO_TARGET_DIR/deploy-image/ (deploy/image/*.Containerfile; sagad's by sagad-rootfs.sh,
# which deploy/Dockerfile's build stage runs too, building from source where a registry is
# reachable).
#
# Environment: CARGO_TARGET_DIR as cargo reads it (the binaries are taken from its release/,
# built when missing); DEPLOY_PROFILE=debug to take them from its debug/ instead (CI, which
# has built those already); SAGAD_BIN_DIR to take them from elsewhere; SAGAD_IMAGE and
# SAGAD_POSTGRES_IMAGE to name the images otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
# shellcheck source=SCRIPTDIR/../profile.sh
. deploy/profile.sh
bin=${SAGAD_BIN_DIR:-$target/$profile}
sagad_image=${SAGAD_IMAGE:-localhost/sagad:local}
postgres_image=${SAGAD_POSTGRES_IMAGE:-localhost/sagad-postgres:local}
work=$target/deploy-image
binaries=(sagad sagactl order-service payment-service shipping-service)

say() { printf 'image/build.sh: %s\n' "$*" >&2; }
fail() {
  say "$*"
  exit 1
}

deploy/ensure-podman.sh
# shellcheck source=SCRIPTDIR/../podman/env.sh
. deploy/podman/env.sh

missing=0
for name in "${binaries[@]}"; do
  [[ -x $bin/$name ]] || missing=1
done
if ((missing)); then
  [[ -z ${SAGAD_BIN_DIR:-} ]] || fail "SAGAD_BIN_DIR=$bin lacks one of: ${binaries[*]}"
  say "building the $profile binaries"
  cargo build "${build_flags[@]}" --workspace --locked --bins
fi

# --- sagad ---------------------------------------------------------------------------------
ctx=$work/sagad
mkdir -p "$ctx"
deploy/image/sagad-rootfs.sh "$bin" "$ctx/rootfs"

version=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
say "building $sagad_image"
podman build --quiet --layers -f deploy/image/sagad.Containerfile \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  -t "$sagad_image" "$ctx" >/dev/null

# --- postgres ------------------------------------------------------------------------------
pg_major=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null |
  sort -V | tail -n 1)
if [[ -z $pg_major || ! -x /usr/lib/postgresql/$pg_major/bin/postgres ]]; then
  say "PostgreSQL is not installed here"
  deploy/ensure-postgres.sh
  pg_major=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
fi
pg_bin=/usr/lib/postgresql/$pg_major/bin
pg_lib=/usr/lib/postgresql/$pg_major/lib
pg_share=/usr/share/postgresql/$pg_major

ctx=$work/postgres
rm -rf "$ctx"
rootfs=$ctx/rootfs
mkdir -p "$rootfs$pg_bin" "$rootfs$pg_lib" "$rootfs/usr/share/postgresql" "$rootfs/bin" \
  "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"
# initdb runs postgres, and checks its version, through popen(): /bin/sh.
cp /bin/dash "$rootfs/bin/sh"
for name in postgres initdb pg_isready psql; do
  cp "$pg_bin/$name" "$rootfs$pg_bin/"
done
# The server's modules (procedural languages, dictionaries, encodings), less the JIT's.
find "$pg_lib" -maxdepth 1 -name '*.so' ! -name 'llvmjit*' -exec cp {} "$rootfs$pg_lib/" \;
cp -r "$pg_share" "$rootfs/usr/share/postgresql/"
cp -r /usr/share/zoneinfo "$rootfs/usr/share/zoneinfo"
deploy/image/copy-libs.sh "$rootfs" /bin/dash "$rootfs$pg_bin"/* "$rootfs$pg_lib"/*.so
cp deploy/image/postgres-entrypoint.sh "$rootfs/usr/local/bin/postgres-entrypoint"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
  'postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'postgres:x:999:' >"$rootfs/etc/group"
chmod -R go-w "$rootfs"
chmod 1777 "$rootfs/tmp"
# What user postgres writes: its data folder and the socket folder (COPY --chown=999:999).
mkdir -p "$ctx/owned/var/lib/postgresql/data" "$ctx/owned/var/run/postgresql"
chmod 0700 "$ctx/owned/var/lib/postgresql/data"
chmod 2775 "$ctx/owned/var/run/postgresql"

say "building $postgres_image (PostgreSQL $pg_major)"
podman build --quiet --layers -f deploy/image/postgres.Containerfile \
  --build-arg PG_MAJOR="$pg_major" -t "$postgres_image" "$ctx" >/dev/null

# The images these replaced (left untagged) go: podman's storage here is the project's own.
podman image prune --force >/dev/null

# --- sizes ---------------------------------------------------------------------------------
for image in "$sagad_image" "$postgres_image"; do
  bytes=$(podman image inspect --format '{{.Size}}' "$image")
  printf 'image %s: %s bytes (%s MiB)\n' "$image" "$bytes" "$(((bytes + 524288) / 1048576))"
done
