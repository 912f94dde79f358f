#!/usr/bin/env bash
# Makes sure rootful podman can build and run containers here: installs Debian's podman, runc,
# netavark, aardvark-dns and iptables where any is missing (with sudo when not run as root), and
# the linter deploy/test.sh checks the scripts with (shellcheck).
# Podman's settings are the project's (deploy/podman/, see env.sh). podman-compose comes from
# deploy/ensure-tools.sh, pinned (Debian's 1.0.3 runs every health check through /bin/sh,
# which the images do not have).
set -euo pipefail

say() { printf 'ensure-podman: %s\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
[[ -x /usr/lib/podman/netavark ]] || missing+=(netavark)
[[ -x /usr/lib/podman/aardvark-dns ]] || missing+=(aardvark-dns)
command -v iptables >/dev/null || missing+=(iptables)
command -v shellcheck >/dev/null || missing+=(shellcheck)
((${#missing[@]} == 0)) && exit 0

say "installing ${missing[*]} from Debian's packages"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
command -v podman >/dev/null || { say "podman is still missing after the install"; exit 1; }
