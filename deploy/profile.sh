# Sourced by deploy/image/build.sh and deploy/test.sh: which build of the binaries they take.
# DEPLOY_PROFILE=release (the default) or debug (CI, whose tests built those already); sets
# `profile` (the folder under the target directory) and `build_flags` (cargo's, to build them).
# shellcheck shell=bash disable=SC2034
profile=${DEPLOY_PROFILE:-release}
case $profile in
  release) build_flags=(--release) ;;
  debug) build_flags=() ;;
  *)
    printf '%s: DEPLOY_PROFILE must be release or debug, not %s\n' "$0" "$profile" >&2
    exit 2
    ;;
esac
