#!/usr/bin/env bash
# Copies into ROOTFS, at the paths the dynamic loader looks for them, every shared library the
# FILEs need (ldd resolves them transitively) and the loader itself.
#
#   deploy/image/copy-libs.sh ROOTFS FILE...
set -euo pipefail

rootfs=$1
shift
for file in "$@"; do
  if ldd "$file" | grep -q 'not found'; then
    ldd "$file" >&2
    echo "copy-libs: $file needs a library this machine lacks" >&2
    exit 1
  fi
done
for file in "$@"; do
  ldd "$file" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
