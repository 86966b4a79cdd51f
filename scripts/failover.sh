#!/usr/bin/env bash
# Failover after kill -9, measured end to end on this machine: a fresh nats-server (own port
# and JetStream store), two instances that both own every shard (holder and standby, the
# default config otherwise), traffic on every shard, then kill -9 of the holder and, at once,
# one digest request per shard. It prints, per shard, the time from the kill until that
# shard's digest reached a plain subscriber, then the median and the max.
#   ./scripts/failover.sh                          # 16 shards, release build
#   BENCH_BIN=target/debug/alarm-digest ./scripts/failover.sh
# Everything it starts is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
shards="${ALARM_DIGEST_SHARDS__COUNT:-16}"
events="${EVENTS_PER_SHARD:-20}"

# shellcheck source=scripts/broker.sh
. scripts/broker.sh
setup_work failover KILL

start_broker
export ALARM_DIGEST_NATS__URL="$url" ALARM_DIGEST_SHARDS__COUNT="$shards"

start_instance() {
  ALARM_DIGEST_STORAGE__PATH="$work/data-$1" ALARM_DIGEST_HTTP__LISTEN="$2" RUST_LOG=warn \
    "$bin" run 2>>"$work/instance-$1.log" &
}
http_a="127.0.0.1:$((20000 + RANDOM % 10000))"
http_b="127.0.0.1:$((30000 + RANDOM % 10000))"
start_instance a "$http_a"
pids+=("$!")
holder="$!"
until ready "$http_a"; do sleep 0.05; done
start_instance b "$http_b"
pids+=("$!")

# One user per shard: crc32(UserID) mod shards, as the service routes.
read -r -a users <<<"$(python3 - "$shards" <<'EOF'
import sys, zlib
n = int(sys.argv[1]); found = {}; i = 0
while len(found) < n:
    user = f"user-{i}"; found.setdefault(zlib.crc32(user.encode()) % n, user); i += 1
print(" ".join(found[s] for s in range(n)))
EOF
)"

# A plain subscriber; each digest timestamped as it arrives.
("$bin" watch 2>/dev/null & echo "$!" >"$work/watch.pid"; wait) | while IFS= read -r line; do
  printf '%s %s\n' "$(date +%s%N)" "$line"
done >"$work/digests.log" &
until [ -s "$work/watch.pid" ]; do sleep 0.05; done
pids+=("$(cat "$work/watch.pid")")

for ((k = 0; k < events; k++)); do
  for user in "${users[@]}"; do
    printf '{"AlarmID":"a%d","UserID":"%s","Status":"CRITICAL","ChangedAt":"2026-01-01T00:00:%02dZ"}\n' \
      "$k" "$user" $((k % 60))
  done
done >"$work/events"
while IFS= read -r payload; do "$bin" publish AlarmStatusChanged "$payload"; done <"$work/events" &
publisher="$!"
wait "$publisher"
sleep 2

kill -9 "$holder"
killed="$(date +%s%N)"
for user in "${users[@]}"; do
  "$bin" publish SendAlarmDigest "{\"UserID\":\"$user\"}" &
done
wait_until="$((killed + 60 * 1000000000))"
while [ "$(grep -c '"UserID"' "$work/digests.log" 2>/dev/null || true)" -lt "$shards" ]; do
  [ "$(date +%s%N)" -lt "$wait_until" ] || { echo "failover: not every shard answered within 60 s" >&2; break; }
  sleep 0.05
done

echo "failover after kill -9 of the holder of all $shards shards (lease $(( ${ALARM_DIGEST_SHARDS__LEASE_SECS:-3} )) s, standby with an overlapping shards.owned)"
for ((s = 0; s < shards; s++)); do
  user="${users[$s]}"
  at="$(grep "\"UserID\":\"$user\"" "$work/digests.log" | head -1 | cut -d' ' -f1)"
  [ -n "$at" ] && echo "$s $(( (at - killed) / 1000000 ))"
done | tee "$work/per-shard" | awk '{ printf "shard %2d answered %5d ms after the kill\n", $1, $2 }'
sort -n -k2 "$work/per-shard" | awk '{ v[NR] = $2 } END {
  if (NR == 0) { print "no shard answered"; exit 1 }
  printf "median %d ms, max %d ms over %d shards\n", v[int((NR + 1) / 2)], v[NR], NR }'
