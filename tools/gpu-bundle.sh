#!/usr/bin/env bash
# Build what kvfs needs on the GPU machine (Python 3.12, torch there; no network, no libfuse3,
# no pyfuse3, no etcd) into .gpu-bundle/ of the checkout (ignored by git). Extends
# ../shared/tools/gpu-bundle.sh: pyfuse3 carries our passthrough patch and links the private
# libfuse 3.17 (libfuse3.so.4) that tools/setup.sh builds into .venv/libfuse, so FUSE
# passthrough works there as here.
#
#   tools/setup.sh && bash tools/gpu-bundle.sh        # on this machine, from the project root
#   then with the device tool:  run(command="source .gpu-bundle/env.sh && <your command>",
#                                   carry=[".gpu-bundle"])
#
# env.sh installs the wheels into /tmp/site, puts libfuse3, fusermount3 and etcd on the paths and
# makes `import kvfs, kvfs_connector` work from the checkout (python3 -m kvfs.cli mount ...).
# About a minute; about 35 MiB (the device call carries at most 64 MiB with the checkout).
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel); cd "$ROOT"
B=.gpu-bundle
LIBFUSE=$PWD/.venv/libfuse
[ -e "$LIBFUSE"/lib/libfuse3.so.4 ] || { echo "no $LIBFUSE: run tools/setup.sh first" >&2; exit 1; }
PY312=${PY312:-$(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
"${PY312:-python3.12}" -c 'import sys; assert sys.version_info[:2] == (3, 12)' || { echo "need Python 3.12 (set PY312)" >&2; exit 1; }
rm -rf "$B" && mkdir -p "$B"/deb "$B"/x "$B"/lib "$B"/bin "$B"/whl "$B"/src
(cd "$B"/deb && apt-get -o APT::Sandbox::User=root download -q fuse3 etcd-server >/dev/null)
for f in "$B"/deb/*.deb; do dpkg -x "$f" "$B"/x; done
# Debian 12's fusermount3 unmounts the libfuse 3.17 mounts too (same kernel protocol)
cp -a "$B"/x/bin/fusermount3 "$B"/x/usr/bin/etcd "$B"/bin/
cp -L "$LIBFUSE"/lib/libfuse3.so.4 "$B"/lib/
# The patched pyfuse3 source, as tools/setup.sh prepares it (same pinned sdist, same patch)
"$PY312" -m pip download -q --no-binary pyfuse3 --no-deps -d "$B"/src pyfuse3==3.5.0
echo "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24  $B/src/pyfuse3-3.5.0.tar.gz" |
  sha256sum -c --quiet
tar -xzf "$B"/src/pyfuse3-3.5.0.tar.gz -C "$B"/src
patch -s -d "$B"/src/pyfuse3-3.5.0 -p1 <tools/patches/pyfuse3-passthrough.patch
rm -f "$B"/src/pyfuse3-3.5.0/src/pyfuse3/__init__.c # Cython output of the unpatched .pyx
# No rpath: the library sits elsewhere there; env.sh puts it on LD_LIBRARY_PATH
V=3.5.0+passthrough.sha$(sha256sum tools/patches/pyfuse3-passthrough.patch | cut -c1-8) # as setup.sh
PKG_CONFIG_PATH=$LIBFUSE/lib/pkgconfig SETUPTOOLS_SCM_PRETEND_VERSION=$V \
  "$PY312" -m pip wheel -q --no-deps -w "$B"/whl "$B"/src/pyfuse3-3.5.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$B"/whl \
  trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1 etcd-sdk-python==0.0.7 crc32c==2.9.post0 \
  grpcio==1.85.3 protobuf==7.36.2 prometheus-client==0.26.0 \
  py-spy==0.4.3 `# the daemon's profile where a target is missed` \
  attrs==26.1.0 sortedcontainers==2.4.0 idna==3.20 typing_extensions==4.16.0 # theirs, in case the image lacks them
rm -rf "$B"/deb "$B"/x "$B"/src
cat > "$B"/env.sh <<'ENV'
# source .gpu-bundle/env.sh  (on the GPU machine, from the project root)
_b=$PWD/.gpu-bundle
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$_b"/whl/*.whl || return 1
mkdir -p /tmp/src && ln -sfn "$PWD/kvfs" /tmp/src/kvfs && ln -sfn "$PWD/connector" /tmp/src/kvfs_connector
chmod +x "$_b"/bin/*
export PYTHONPATH=/tmp/site:/tmp/src LD_LIBRARY_PATH=$_b/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$_b/bin:$PATH PYTHONUNBUFFERED=1
python3 -c 'import pyfuse3, trio, pyetcd, kvfs, kvfs_connector, torch; pyfuse3.passthrough_open; print("gpu-bundle ready (pyfuse3", pyfuse3.__version__ + "):", torch.cuda.get_device_name(0))'
ENV
du -sh "$B"; echo "carry: [\"$B\"]"
