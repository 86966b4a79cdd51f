#!/usr/bin/env bash
# The scaling curve on one small machine: every broker node and every instance in a cgroup
# capped at a CPU quota of its own (scripts/broker.sh, CAP_NODE / CAP_INSTANCE), so each stands
# for a small machine, and `alarm-digest bench` ingesting EVENTS events with no digests. The
# ratios between rows of one sitting are the figure; absolute rates mean little here.
#   ./scripts/scaling.sh                 # every part below, ROUNDS=2 runs each
#   PARTS="r1 r3" ./scripts/scaling.sh   # some parts: r1 r3 nodes instances
# Parts:
#   r1        3 nodes, R1, 3 instances: P = 1 against P = 3 (streams placed by node tag), P = 3
#             with each partition read through whichever node an instance's connection is on
#             (nats.connect_to_leaders = false), and P = 3 placed by the broker, as the
#             release before left it
#   r3        3 nodes, R3, 3 instances: P = 1 against P = 3 (leaders balanced), P = 3 read
#             through any node, and P = 3 with the leaders as elected, as the release before
#             left them
#   nodes     R3, 3 instances, P = nodes: 3 nodes against 6 (smaller caps, so both fit)
#   instances 3 nodes, R1, P = 3: 1, 2 and 4 instances
# Output: one line per run (rate, CPU per process, leaders per node), then a table.
set -euo pipefail
cd "$(dirname "$0")/.."
events="${EVENTS:-100000}"
rounds="${ROUNDS:-2}"
parts="${PARTS:-r1 r3 nodes instances}"
cargo build --release --locked --quiet
export BENCH_BIN="$PWD/target/release/alarm-digest"
log="$(mktemp /tmp/alarm-digest-scaling.XXXXXX)"
results=()

# run LABEL VAR=VALUE...: one capped bench run; records "LABEL rate".
run() {
  local label="$1"; shift
  local out rate
  out="$(env "$@" ./scripts/bench.sh --events "$events" --users 20000 --digests 0 2>>"$log")"
  rate="$(grep -o '= *[0-9]* events/s' <<<"$out" | grep -o '[0-9]*' | head -1)"
  echo "$label: ${rate:-?} events/s | $(grep '^cpu during' <<<"$out" | cut -d: -f2-) | $(grep '^leaders' <<<"$out" | cut -c10-)"
  results+=("$label ${rate:-0}")
}

for ((round = 1; round <= rounds; round++)); do
  for part in $parts; do
    case "$part" in
      r1)
        for p in 1 3; do
          run "R1 3 nodes P=$p I=3" NODES=3 REPLICAS=1 PARTITIONS=$p INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4
        done
        run "R1 3 nodes P=3 I=3 read via any node" ALARM_DIGEST_NATS__CONNECT_TO_LEADERS=false NODES=3 REPLICAS=1 PARTITIONS=3 INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4
        run "R1 3 nodes P=3 I=3 broker-placed" PLACEMENT=broker NODES=3 REPLICAS=1 PARTITIONS=3 INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4 ;;
      r3)
        for p in 1 3; do
          run "R3 3 nodes P=$p I=3" NODES=3 REPLICAS=3 PARTITIONS=$p INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4
        done
        run "R3 3 nodes P=3 I=3 read via any node" ALARM_DIGEST_NATS__CONNECT_TO_LEADERS=false NODES=3 REPLICAS=3 PARTITIONS=3 INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4
        run "R3 3 nodes P=3 I=3 as elected" ALARM_DIGEST_STREAMS__BALANCE_EVERY_SECS=0 NODES=3 REPLICAS=3 PARTITIONS=3 INSTANCES=3 CAP_NODE=0.25 CAP_INSTANCE=0.4 ;;
      nodes)
        for n in 3 6; do
          run "R3 $n nodes P=$n I=3 (0.15/0.3)" NODES=$n REPLICAS=3 PARTITIONS=$n INSTANCES=3 CAP_NODE=0.15 CAP_INSTANCE=0.3
        done ;;
      instances)
        for i in 1 2 4; do
          run "R1 3 nodes P=3 I=$i" NODES=3 REPLICAS=1 PARTITIONS=3 INSTANCES=$i CAP_NODE=0.25 CAP_INSTANCE=0.3
        done ;;
      *) echo "unknown part $part" >&2; exit 2 ;;
    esac
  done
done

echo
echo "median events/s over $rounds round(s), $events events each ($(nproc) cores, $("${NATS_SERVER_BIN:-$(. scripts/nats-server.sh; nats_server_bin "$NATS_SERVER_NEWEST")}" --version)):"
printf '%s\n' "${results[@]}" | awk '{ rate = $NF; $NF = ""; runs[$0] = runs[$0] " " rate; order[$0] = order[$0] ? order[$0] : ++n }
  END { for (k in order) keys[order[k]] = k
        for (i = 1; i <= n; i++) { k = keys[i]; m = split(runs[k], r, " "); asort(r)
          med = (m % 2) ? r[(m + 1) / 2] : (r[m / 2] + r[m / 2 + 1]) / 2
          printf "  %-34s %8.0f   (runs:%s)\n", k, med, runs[k] } }'
echo "(bench stderr: $log)"
