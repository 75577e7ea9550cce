#!/usr/bin/env bash
# Create (or reuse) benchmarks/.venv-peers with the peer routers fdcore is compared against:
# sglang-router and vllm-router. Kept apart from the project venv so their dependencies never
# touch it. Idempotent: safe to run repeatedly and concurrently with other users of the venv.
#
# Usage: benchmarks/setup_peers.sh            # create/refresh the venv
#        PEERS_PYTHON=python3.12 benchmarks/setup_peers.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEERS_VENV:-$HERE/.venv-peers}"
PY="${PEERS_PYTHON:-python3}"
SGLANG_ROUTER_VERSION="0.3.2"
VLLM_ROUTER_VERSION="0.1.17"

# Serialise concurrent runs of this script (another benchmark may create the same venv). The
# lock lives inside the venv directory, which is git-ignored; `python -m venv` accepts a
# directory that already exists.
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

pip_install() {
    # pip install, without its notes about index locations this machine's pip config lists but
    # that do not exist; pip's exit status is kept.
    "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $($PY --version 2>&1)"
    "$PY" -m venv "$VENV"
    pip_install --upgrade pip
fi

installed() {
    # installed NAME VERSION -> exit 0 when exactly that version is present
    [ "$("$VENV/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" = "$2" ]
}

want=()
installed sglang-router "$SGLANG_ROUTER_VERSION" || want+=("sglang-router==$SGLANG_ROUTER_VERSION")
installed vllm-router "$VLLM_ROUTER_VERSION" || want+=("vllm-router==$VLLM_ROUTER_VERSION")

if [ "${#want[@]}" -gt 0 ]; then
    echo "installing ${want[*]} into $VENV"
    pip_install "${want[@]}"
else
    echo "$VENV already has sglang-router==$SGLANG_ROUTER_VERSION and vllm-router==$VLLM_ROUTER_VERSION"
fi
