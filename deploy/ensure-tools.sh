#!/usr/bin/env bash
# Installs the tools deploy/test.sh uses, at the versions pinned in deploy/requirements.txt
# (podman-compose, kubernetes-validate and its Kubernetes JSON schemas) and deploy/package.json
# with package-lock.json (kustomize), under $CARGO_TARGET_DIR/deploy-tools/: a Python virtual
# environment in venv/, npm's node_modules in npm/. Each is made again only when its pinned
# list changed since it was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${CARGO_TARGET_DIR:-target}/deploy-tools
say() { printf 'ensure-tools: %s\n' "$*" >&2; }

venv=$tools/venv
if ! cmp -s deploy/requirements.txt "$venv/requirements.txt"; then
  say "installing deploy/requirements.txt into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    -r deploy/requirements.txt
  cp deploy/requirements.txt "$venv/requirements.txt"
fi

npm_dir=$tools/npm
if ! cmp -s deploy/package-lock.json "$npm_dir/package-lock.json" ||
  ! cmp -s deploy/package.json "$npm_dir/package.json"; then
  say "installing deploy/package-lock.json into $npm_dir"
  rm -rf "$npm_dir"
  mkdir -p "$npm_dir"
  cp deploy/package.json deploy/package-lock.json "$npm_dir/"
  (cd "$npm_dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
fi
