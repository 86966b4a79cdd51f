#!/usr/bin/env bash
# End-to-end benchmark on this machine: a fresh nats-server (own port and JetStream store),
# fresh release instance(s) of alarm-digest, then `alarm-digest bench "$@"` against them.
#   ./scripts/bench.sh --events 200000 --broker-ceiling
#   INSTANCES=3 ./scripts/bench.sh --events 200000     # shards split s % 3 across 3 instances
# Everything it starts is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
instances="${INSTANCES:-1}"
shards="${ALARM_DIGEST_SHARDS__COUNT:-16}"

nats_bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
[ -x "$nats_bin" ] || { echo "bench: nats-server missing: apt-get install nats-server" >&2; exit 1; }
cargo build --release --locked --quiet
bin="$PWD/target/release/alarm-digest"

work="$(mktemp -d /tmp/alarm-digest-bench.XXXXXX)"
pids=()
cleanup() {
  # Instances first (they drain and exit), the broker last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/ports"
"$nats_bin" -a 127.0.0.1 -p -1 --ports_file_dir "$work/ports" -js -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do ls "$work/ports"/*.ports >/dev/null 2>&1 && break; sleep 0.1; done
url="$(grep -o 'nats://[0-9.:]*' "$work/ports"/*.ports | head -1)"
export ALARM_DIGEST_NATS__URL="$url" ALARM_DIGEST_SHARDS__COUNT="$shards"

for ((i = 0; i < instances; i++)); do
  owned="$(seq -s, "$i" "$instances" $((shards - 1)))"
  ALARM_DIGEST_STORAGE__PATH="$work/data-$i" ALARM_DIGEST_HTTP__LISTEN=127.0.0.1:0 \
    ALARM_DIGEST_SHARDS__OWNED="[$owned]" RUST_LOG=warn "$bin" run &
  pids+=("$!")
done
"$bin" setup >/dev/null
sleep 1

extra=()
if [ "$instances" -eq 1 ]; then extra=(--service-pid "${pids[1]}" --data-dir "$work/data-0"); fi
ALARM_DIGEST_STORAGE__PATH="$work/data-0" "$bin" bench "${extra[@]}" "$@"
