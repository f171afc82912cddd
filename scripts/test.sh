#!/usr/bin/env bash
# The whole test suite: what it needs is installed first when it is
# missing (as root, with apt-get; otherwise it says what to install and
# stops — a test is never skipped quietly).
#
#   scripts/test.sh
#
# Runs `cargo test` (unit tests and the integration binary, whose cluster
# tests start Debian's redis-server themselves), then
# deploy/check.sh (hadolint, kubernetes-validate, tokenpool check on the
# shipped config, systemd-analyze verify; the validators go in a venv under
# target/).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run, by the command that shows they are there.
declare -A packages=(
  [systemd-analyze]=systemd
  [redis-server]=redis-server
)
missing=()
for command in "${!packages[@]}"; do
  command -v "$command" >/dev/null || missing+=("${packages[$command]}")
done
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    # A server the package may have started is left alone: the tests
    # start their own on free ports and stop only those.
  else
    echo "scripts/test.sh: missing: ${missing[*]} (Debian: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

echo "== cargo test"
cargo test

echo "== deploy/check.sh"
bash deploy/check.sh
