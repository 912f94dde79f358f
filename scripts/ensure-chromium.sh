#!/usr/bin/env bash
# Makes sure Debian's headless-capable Chromium (`/usr/bin/chromium`) and its WebDriver server
# (`/usr/bin/chromedriver`) are installed: the explorer's browser tests drive them. Installs the
# packages `chromium` and `chromium-driver` where either is missing, with sudo when not run as
# root; the package lists are refreshed only when the first install attempt fails.
set -euo pipefail

say() { printf 'ensure-chromium: %s\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

installed() { [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; }

install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
}

installed && exit 0

say "Chromium or chromedriver is missing: installing Debian's chromium and chromium-driver"
if ! install; then
  say "the install failed: refreshing the package lists and trying again"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  install
fi
installed || { say "Chromium or chromedriver is still missing after the install"; exit 1; }
