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
}

# start_broker: sets $url and appends the broker's pid.
start_broker() {
  mkdir -p "$work/ports"
  # NATS_CONFIG: a server config file to start it with (sync_interval, for example).
  "$nats_bin" -a 127.0.0.1 -p -1 --ports_file_dir "$work/ports" -js -sd "$work/nats" \
    ${NATS_CONFIG:+-c "$NATS_CONFIG"} >"$work/nats.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 100); do ls "$work/ports"/*.ports >/dev/null 2>&1 && break; sleep 0.1; done
  url="$(grep -o 'nats://[0-9.:]*' "$work/ports"/*.ports | head -1)"
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
