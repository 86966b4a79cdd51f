#!/usr/bin/env bash
# Quick start, command 2: the whole test suite — unit and property tests of the rules, and
# integration tests in which every test starts its own real nats-server (random port, own
# JetStream store dir). Installs the Debian packages `nats-server` and `systemd` (for
# systemd-analyze) first when they are missing and we are root; without them the tests that
# need them fail with an install hint.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ] && [ -z "${NATS_SERVER_BIN:-}" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "test: installing the nats-server Debian package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  else
    echo "test: nats-server is not installed; run: sudo apt-get install nats-server" >&2
  fi
fi

# The systemd unit is checked with `systemd-analyze verify` (Debian package `systemd`).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "test: installing systemd for systemd-analyze" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

exec cargo test --locked --all-targets "$@"
