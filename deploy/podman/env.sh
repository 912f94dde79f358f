# Sourced by deploy/image/build.sh and deploy/test.sh, and by hand to look at what they made
# (`. deploy/podman/env.sh; podman ps -a`): points podman at the project's configuration.
# shellcheck shell=bash
_sagad_podman_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF="$_sagad_podman_dir/containers.conf"
export CONTAINERS_STORAGE_CONF="$_sagad_podman_dir/storage.conf"
unset _sagad_podman_dir
