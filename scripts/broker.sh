# Sourced by bench.sh and failover.sh: the alarm-digest build and the nats-server binary they
# run, a work dir removed on exit with everything they started, a fresh broker of their own
# (random port, JetStream store under $work), and the /readyz probe.

# NATS_SERVER_BIN runs another server; by default the newest pinned release (installed when
# missing).
# shellcheck source=scripts/nats-server.sh
. "$(dirname "${BASH_SOURCE[0]}")/nats-server.sh"
nats_bin="${NATS_SERVER_BIN:-$(ensure_nats_server "$NATS_SERVER_NEWEST")}"
[ -x "$nats_bin" ] || { echo "$0: no nats-server at $nats_bin" >&2; exit 1; }
echo "broker: $("$nats_bin" --version)" >&2

# BENCH_BIN runs another build (A/B comparisons); by default the release build.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --locked --quiet; fi
bin="${BENCH_BIN:-$PWD/target/release/alarm-digest}"

# setup_work NAME SIGNAL: a fresh $work (/tmp/alarm-digest-NAME.*) and the array pids; on exit
# every pid gets SIGNAL, newest first (instances before the broker they drain into), and
# $work is removed.
setup_work() {
  work="$(mktemp -d "/tmp/alarm-digest-$1.XXXXXX")"
  pids=()
  stop_signal="$2"
  trap cleanup EXIT
}
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "-$stop_signal" "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  rm -rf "$work"
  cap_cleanup
}

# CPU caps, to stand one small machine in for several: CAP_NODE=0.25 runs every broker node
# and CAP_INSTANCE=0.4 every instance in a cgroup of its own capped at that many cores
# (cgroup v1's cpu controller or v2's cpu.max, whichever the machine has; root only). A 10 ms
# period keeps throttling stalls short. The quotas should add up to less than the machine,
# leaving room for the load tool, which runs uncapped.
cgroup_root=""
cap_setup() {
  if [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu ]; then
    cgroup_root=/sys/fs/cgroup/cpu/alarm-digest-bench-$$
    mkdir -p "$cgroup_root"
  elif [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
    cgroup_root=/sys/fs/cgroup/alarm-digest-bench-$$
    mkdir -p "$cgroup_root"
    echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    echo +cpu >"$cgroup_root/cgroup.subtree_control"
  else
    echo "$0: CAP_NODE / CAP_INSTANCE need a cgroup cpu controller (v1 /sys/fs/cgroup/cpu or v2) and root" >&2
    exit 1
  fi
}
# capped CORES COMMAND...: runs COMMAND in the background in a new cgroup capped at CORES
# (empty: uncapped); $! is its pid, as with a plain `COMMAND &`.
capped() {
  local cores="$1"; shift
  if [ -z "$cores" ]; then "$@" & return; fi
  [ -n "$cgroup_root" ] || cap_setup
  local group quota
  group="$(mktemp -u "$cgroup_root/p.XXXXXX")"
  mkdir "$group"
  quota="$(awk -v c="$cores" 'BEGIN { printf "%d", c * 10000 }')"
  if [ -f "$group/cpu.max" ]; then
    echo "$quota 10000" >"$group/cpu.max"
  else
    echo 10000 >"$group/cpu.cfs_period_us"
    echo "$quota" >"$group/cpu.cfs_quota_us"
  fi
  (echo "$BASHPID" >"$group/cgroup.procs" && exec "$@") &
}
cap_cleanup() {
  [ -n "$cgroup_root" ] || return 0
  sleep 0.2
  for group in "$cgroup_root"/p.*; do rmdir "$group" 2>/dev/null || true; done
  rmdir "$cgroup_root" 2>/dev/null || true
}
# CPU seconds a process has used so far (user + system).
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# start_broker: sets $url (every node's, comma-separated), $broker_pids (comma-separated) and
# appends the brokers' pids. Every node's config includes the mapping `alarm-digest
# nats-mappings` prints for ALARM_DIGEST_STREAMS__INPUT_PARTITIONS (none for one partition).
#   NODES=3: a three-node cluster with routes on loopback (JetStream on every node).
#   NATS_CONFIG: a server config file whose settings every node gets as well (sync_interval,
#   for example).
# In a cluster, node i carries the server tag `alarm-digest:node-<i>`, and $node_tags lists
# them as streams.node_tags takes them.
start_broker() {
  local nodes="${NODES:-1}" i base routes="" node_conf
  mkdir -p "$work/ports"
  "$bin" nats-mappings >"$work/mappings.conf"
  base=$((20000 + RANDOM % 20000))
  for ((i = 0; i < nodes; i++)); do routes+="${routes:+, }\"nats-route://127.0.0.1:$((base + 100 + i))\""; done
  url="" broker_pids="" node_tags=""
  for ((i = 0; i < nodes; i++)); do node_tags+="${node_tags:+,}\"alarm-digest:node-$i\""; done
  node_tags="[$node_tags]"
  for ((i = 0; i < nodes; i++)); do
    node_conf="$work/node-$i.conf"
    {
      echo "include \"mappings.conf\""
      [ -n "${NATS_CONFIG:-}" ] && cat "$NATS_CONFIG"
      if [ "$nodes" -gt 1 ]; then
        echo "server_name: node-$i"
        echo "server_tags: [\"alarm-digest:node-$i\"]"
        echo "cluster { name: bench, listen: \"127.0.0.1:$((base + 100 + i))\", routes: [$routes] }"
      fi
    } >"$node_conf"
    local port=-1
    [ "$nodes" -gt 1 ] && port=$((base + i))
    capped "${CAP_NODE:-}" "$nats_bin" -a 127.0.0.1 -p "$port" --ports_file_dir "$work/ports" \
      -js -sd "$work/nats-$i" -c "$node_conf" >"$work/nats-$i.log" 2>&1
    pids+=("$!")
    broker_pids+="${broker_pids:+,}$!"
  done
  for _ in $(seq 100); do
    [ "$(ls "$work/ports"/*.ports 2>/dev/null | wc -l)" -ge "$nodes" ] && break
    sleep 0.1
  done
  # Each ports file lists the client URL under "nats" (and the route URL under "cluster").
  url="$(grep -ho '"nats":\["nats://[0-9.:]*' "$work/ports"/*.ports | grep -o 'nats://.*' |
    paste -sd, -)"
}

# ready HOST:PORT: whether that instance's /readyz answers 200.
ready() {
  # In a subshell: the redirections must not outlive the probe.
  (
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
    printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
    head -c 12 <&3 | grep -q 200
  ) 2>/dev/null
}
