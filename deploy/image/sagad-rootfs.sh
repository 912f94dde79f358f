#!/usr/bin/env bash
# Lays out the root filesystem of the sagad image in ROOTFS (made anew) from the release
# binaries in BIN_DIR: sagad, sagactl and the three demo participants (stripped of their symbol
# tables) in /usr/local/bin, the shared libraries they link (by ldd) and the dynamic loader, the CA certificates, /etc/passwd and /etc/group with
# user sagad (10001), and saga-defs/ in /etc/sagad/saga-defs. Run from the repository root.
# Both image builds use it: deploy/image/build.sh here, deploy/Dockerfile's build stage.
#
#   deploy/image/sagad-rootfs.sh BIN_DIR ROOTFS
set -euo pipefail

(($# == 2)) || { echo "usage: $0 BIN_DIR ROOTFS" >&2; exit 2; }
bin=$1
rootfs=$2
binaries=(sagad sagactl order-service payment-service shipping-service)

rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/sagad" "$rootfs/etc/ssl/certs"
# Stripped of their symbol tables (a quarter of their size); a panic still names its place.
for name in "${binaries[@]}"; do
  strip -o "$rootfs/usr/local/bin/$name" "$bin/$name"
done
deploy/image/copy-libs.sh "$rootfs" "$rootfs"/usr/local/bin/*
cp -r saga-defs "$rootfs/etc/sagad/saga-defs"
# sagad's https:// participants and OTLP endpoints are checked against the system's roots.
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
  'sagad:x:10001:10001:sagad:/nonexistent:/sbin/nologin' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'sagad:x:10001:' >"$rootfs/etc/group"
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
chmod -R go-w "$rootfs"
