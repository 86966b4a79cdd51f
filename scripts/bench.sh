#!/usr/bin/env bash
# End-to-end benchmark on this machine: a fresh nats-server (own port and JetStream store),
# fresh release instance(s) of alarm-digest, then `alarm-digest bench "$@"` against them.
#   ./scripts/bench.sh --events 200000 --broker-ceiling
#   INSTANCES=3 ./scripts/bench.sh --events 200000     # shards split s % 3 across 3 instances
#   STANDBY=1 ./scripts/bench.sh --events 300000 --digests 0   # plus a warm standby of every shard
#   PARTITIONS=4 NODES=3 INSTANCES=4 ./scripts/bench.sh --events 600000 --users 100000 --digests 0
#                              # 4 input partitions (the mapping in every node's config), a
#                              # three-node cluster on loopback, 4 instances: each one's share
#   ENVELOPE_FORMAT=1 ./scripts/bench.sh --events 200000 --digests 0
#                              # routers write envelope-1 (the inputs' JSON, parsed twice):
#                              # the side-by-side for parsing once (the default, 2)
#   ALARM_DIGEST_SHARDS__COUNT=1 MEASURE_RESTORE=1 ./scripts/bench.sh --events 1000000 --users 100000
#                                                      # one shard of 1M alarms: snapshot, restore
#   NODES=3 REPLICAS=1 PARTITIONS=3 INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4 \
#     ./scripts/bench.sh --events 100000 --digests 0
#                              # each node and instance capped at a CPU quota of its own: a
#                              # cluster of small machines on one box (scripts/scaling.sh runs
#                              # the whole curve). With NODES > 1 and one replica, streams are
#                              # placed by node tag (PLACEMENT=broker: as JetStream likes);
#                              # replicated leaders are balanced first (unless
#                              # ALARM_DIGEST_STREAMS__BALANCE_EVERY_SECS=0: as elected)
# With NODES > 1 it prints the CPU each node and instance used during the run and how many
# streams each node leads.
# Instance logs (snapshots and restores at info) go to $work/instance-<i>.log and are shown at
# the end. Everything it starts is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
instances="${INSTANCES:-1}"
shards="${ALARM_DIGEST_SHARDS__COUNT:-16}"
export ALARM_DIGEST_STREAMS__INPUT_PARTITIONS="${PARTITIONS:-${ALARM_DIGEST_STREAMS__INPUT_PARTITIONS:-1}}"
export ALARM_DIGEST_STREAMS__REPLICAS="${REPLICAS:-${ALARM_DIGEST_STREAMS__REPLICAS:-1}}"

# shellcheck source=scripts/broker.sh
. scripts/broker.sh
setup_work bench TERM

start_broker
export ALARM_DIGEST_NATS__URL="$url" ALARM_DIGEST_SHARDS__COUNT="$shards"
if [ "${NODES:-1}" -gt 1 ] && [ "${PLACEMENT:-tags}" = tags ]; then
  export ALARM_DIGEST_STREAMS__NODE_TAGS="$node_tags"
fi
first_instance=${#pids[@]}

https=()
for ((i = 0; i < instances; i++)); do https+=("127.0.0.1:$((20000 + RANDOM % 20000))"); done
http0="${https[0]}"
start_instance() {
  local i="$1" listen="${https[$1]}"
  # Ordinal ownership, as a StatefulSet runs it: instance i owns shards s % instances == i.
  ALARM_DIGEST_STORAGE__PATH="$work/data-$i" ALARM_DIGEST_HTTP__LISTEN="$listen" \
    ALARM_DIGEST_SHARDS__OWNED=ordinal ALARM_DIGEST_SHARDS__REPLICAS="$instances" \
    ALARM_DIGEST_SHARDS__ORDINAL="$i" RUST_LOG="warn,alarm_digest::shard_worker=info" \
    capped "${CAP_INSTANCE:-}" "$bin" run 2>>"$work/instance-$i.log"
}
# ENVELOPE_FORMAT=1: the routers write the release before's envelopes (each input's JSON,
# parsed again by the shard worker), for a side-by-side with the default (2: parsed once).
if [ -n "${ENVELOPE_FORMAT:-}" ]; then
  "$bin" setup >/dev/null
  "$bin" streams envelopes --format "$ENVELOPE_FORMAT" >/dev/null
fi
for ((i = 0; i < instances; i++)); do
  start_instance "$i"
  pids+=("$!")
done
"$bin" setup >/dev/null
sleep 1

# STANDBY=1 (with one instance): a second instance owning every shard too, so it is the warm
# standby of all of them; what it cost during the run (CPU, RSS, messages it followed) is
# printed at the end. Compare with a run without it for the broker's share.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
metric_of() {
  (
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}"
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
    grep -E "^$2 " <&3 | awk '{ print $2 }'
  ) 2>/dev/null || echo "?"
}
if [ "${STANDBY:-0}" = 1 ]; then
  [ "$instances" -eq 1 ] || { echo "STANDBY=1 needs INSTANCES=1" >&2; exit 2; }
  until ready "$http0"; do sleep 0.05; done
  http_standby="127.0.0.1:$((40000 + RANDOM % 20000))"
  ALARM_DIGEST_STORAGE__PATH="$work/data-standby" ALARM_DIGEST_HTTP__LISTEN="$http_standby" \
    RUST_LOG=warn "$bin" run 2>>"$work/instance-standby.log" &
  standby_pid="$!"
  pids+=("$standby_pid")
  until ready "$http_standby"; do sleep 0.05; done
  standby_ticks="$(cpu_ticks "$standby_pid")"
  # How far behind the holder it is, summed over the shards, every 0.2 s.
  (
    while sleep 0.2; do
      (
        exec 3<>"/dev/tcp/${http_standby%:*}/${http_standby##*:}"
        printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
        grep -E '^alarm_digest_standby_behind_messages' <&3 | awk '{ t += $2 } END { print t + 0 }'
      ) 2>/dev/null
    done >"$work/standby-behind.log"
  ) &
  pids+=("$!")
fi

# WATCH_STREAM_BYTES=1: sample every shard stream's size each second during the run and print
# the largest total and the largest single stream (the broker disk the snapshots bound).
if [ "${WATCH_STREAM_BYTES:-0}" = 1 ]; then
  (
    while sleep 1; do
      "$bin" shard status 2>/dev/null | grep -o '"stream":{[^}]*}' | grep -o '"bytes":[0-9]*' |
        cut -d: -f2 | awk '{ t += $1; if ($1 > m) m = $1 } END { print t, m }'
    done >"$work/stream-bytes.log"
  ) &
  pids+=("$!")
fi

extra=()
if [ "$instances" -eq 1 ]; then extra=(--service-pid "${pids[$first_instance]}" --data-dir "$work/data-0"); fi
# Every instance ready (each holds its shards) before the clock starts.
for ((i = 0; i < instances; i++)); do until ready "${https[$i]}"; do sleep 0.1; done; done
# Replicated streams on a cluster: leaders moved to the plan before the clock starts (the
# instances would do it within streams.balance_every_secs anyway).
if [ "${NODES:-1}" -gt 1 ] && [ "$ALARM_DIGEST_STREAMS__REPLICAS" -gt 1 ] &&
  [ "${ALARM_DIGEST_STREAMS__BALANCE_EVERY_SECS:-30}" != 0 ]; then
  for _ in 1 2 3 4 5 6; do
    "$bin" streams balance | grep -q "where the plan wants it" && break
    sleep 2
  done
fi
cpu_before=()
for pid in "${pids[@]}"; do cpu_before+=("$(cpu_seconds "$pid")"); done
ALARM_DIGEST_STORAGE__PATH="$work/data-0" "$bin" bench --broker-pid "$broker_pids" "${extra[@]}" "$@"

# In a cluster: CPU per node and per instance during the run, and the streams each node leads.
if [ "${NODES:-1}" -gt 1 ]; then
  line="cpu during the run (s):"
  for ((i = 0; i < ${#pids[@]}; i++)); do
    used="$(awk -v a="$(cpu_seconds "${pids[$i]}")" -v b="${cpu_before[$i]}" 'BEGIN { printf "%.2f", a - b }')"
    if ((i < first_instance)); then line+=" node-$i $used"; else line+=" instance-$((i - first_instance)) $used"; fi
  done
  echo "$line"
  "$bin" streams status | grep '"node"' | sed -E 's/,"streams":\[[^]]*\]//' |
    awk '{ printf "%s%s", sep, $0; sep = "  " } END { print "" }' | sed 's/^/leaders: /'
fi

# Each instance's share of the work: inputs it routed, status changes it applied.
if [ "$instances" -gt 1 ]; then
  routed=() applied=()
  for ((i = 0; i < instances; i++)); do
    routed+=("$(metric_of "${https[$i]}" alarm_digest_routed_total)")
    applied+=("$(metric_of "${https[$i]}" alarm_digest_events_applied_total)")
  done
  total_routed="$(printf '%s\n' "${routed[@]}" | awk '{ t += $1 } END { print t }')"
  for ((i = 0; i < instances; i++)); do
    echo "instance $i: routed ${routed[$i]} ($(awk -v a="${routed[$i]}" -v t="$total_routed" 'BEGIN { printf "%.0f", t ? 100 * a / t : 0 }')% of all), applied ${applied[$i]} status changes"
  done
fi

if [ "${STANDBY:-0}" = 1 ]; then
  sleep 2
  echo "standby: $(( ($(cpu_ticks "$standby_pid") - standby_ticks) * 1000 / $(getconf CLK_TCK) )) ms CPU during the run," \
    "RSS $(awk '/VmRSS/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$standby_pid/status")," \
    "$(metric_of "$http_standby" alarm_digest_standby_applied_total) shard log messages followed," \
    "at most $(sort -n "$work/standby-behind.log" | tail -1) behind (all shards, sampled every 0.2 s)"
fi

# SHOW_METRICS=1: print instance 0's /metrics counters after the run.
if [ "${SHOW_METRICS:-0}" = 1 ]; then
  (
    exec 3<>"/dev/tcp/${http0%:*}/${http0##*:}"
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
    grep -E '^alarm_digest_[a-z_]+(_total|_count|_sum) ' <&3
  ) 2>/dev/null || true
fi

# MEASURE_RESTORE=1: stop instance 0 gracefully (its final snapshots), wipe its data dir (a
# lost volume), start it again: time until every shard is restored, replayed and ready.
if [ "${MEASURE_RESTORE:-0}" = 1 ]; then
  kill -TERM "${pids[$first_instance]}"
  wait "${pids[$first_instance]}" || true
  rm -rf "$work/data-0"
  started="$(date +%s%N)"
  start_instance 0
  pids[$first_instance]="$!"
  until ready "$http0"; do sleep 0.01; done
  echo "restore to ready from snapshots $(( ($(date +%s%N) - started) / 1000000 )) ms  (instance 0, wiped data dir, now $(du -sh "$work/data-0" | cut -f1))"
  "$bin" shard status | grep -o '"snapshot":{[^}]*}' | sort | uniq -c | head -5
fi

# MEASURE_RESTART=1: stop instance 0 gracefully, start it again on its data, time to ready.
if [ "${MEASURE_RESTART:-0}" = 1 ]; then
  kill -TERM "${pids[$first_instance]}"
  wait "${pids[$first_instance]}" || true
  started="$(date +%s%N)"
  start_instance 0
  pids[$first_instance]="$!"
  until ready "$http0"; do sleep 0.01; done
  echo "restart to ready $(( ($(date +%s%N) - started) / 1000000 )) ms  (instance 0, $(du -sh "$work/data-0" | cut -f1) data dir)"
fi

if [ "${WATCH_STREAM_BYTES:-0}" = 1 ]; then
  awk '$1 > t { t = $1 } $2 > m { m = $2 }
    END { printf "shard streams at most %.1f MiB in all, %.1f MiB in one (sampled each second)\n", t / 1048576, m / 1048576 }' \
    "$work/stream-bytes.log"
fi

echo "--- instance logs: snapshots and restores"
grep -hE "snapshot stored|restored the shard|state restored|out of order" "$work"/instance-*.log | sed 's/\x1b\[[0-9;]*m//g' | tail -12 || true
