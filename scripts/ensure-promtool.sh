#!/usr/bin/env bash
# Makes sure `promtool` (Prometheus's checker, from Debian's `prometheus` package) is on the
# PATH: the tests lint sagad's metrics page with it. Installs the package where it is missing,
# with sudo when not run as root; the Prometheus server it also brings is stopped and disabled
# where systemd started it.
set -euo pipefail

say() { printf 'ensure-promtool: %s\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

command -v promtool >/dev/null && exit 0

say "promtool is missing: installing Debian's prometheus package"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  prometheus >/dev/null
if [[ -d /run/systemd/system ]]; then
  as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null || { say "promtool is still missing after the install"; exit 1; }
