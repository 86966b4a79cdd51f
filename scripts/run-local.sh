#!/usr/bin/env bash
# Quick start, command 1: runs alarm-digest against a local NATS server with JetStream.
#
# If nothing listens at the NATS URL (default nats://127.0.0.1:4222), starts nats-server with
# JetStream in the background (store and log under .local/nats/), installing the Debian
# package `nats-server` first when it is missing and we are root. Extra arguments go to
# `alarm-digest run`; configuration comes from ALARM_DIGEST_* variables (see README).
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

find_nats_server() {
  command -v nats-server 2>/dev/null || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } || true
}

if ! reachable; then
  bin="$(find_nats_server)"
  if [ -z "$bin" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "run-local: installing the nats-server Debian package" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
      bin="$(find_nats_server)"
    else
      echo "run-local: nats-server is not installed; run: sudo apt-get install nats-server" >&2
      exit 1
    fi
  fi
  mkdir -p .local/nats
  nohup "$bin" -js -a "$host" -p "$port" -sd "$PWD/.local/nats/store" \
    >.local/nats/nats-server.log 2>&1 &
  echo "run-local: started nats-server (pid $!) with JetStream on $host:$port; log .local/nats/nats-server.log" >&2
  for _ in $(seq 100); do reachable && break; sleep 0.1; done
  reachable || { echo "run-local: nats-server did not come up; see .local/nats/nats-server.log" >&2; exit 1; }
fi

if ! command -v cargo >/dev/null; then
  echo "run-local: cargo is missing: alarm-digest needs Rust 1.89 or newer (https://rustup.rs)" >&2
  exit 1
fi
export ALARM_DIGEST_NATS__URL="$url"
exec cargo run --release --locked --quiet -- run "$@"
