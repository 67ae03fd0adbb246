#!/usr/bin/env bash
# Fresh machine to a working KV-cache mount: install, mount /kvcache (or $1),
# write a session through it and show what an operator sees.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
MNT=${1:-/kvcache}
KVFS=.venv/bin/kvfs
mkdir -p "$MNT"
if ! mountpoint -q "$MNT"; then
    # no --etcd: kvfs starts a private etcd beside its store
    $KVFS mount "$MNT" --state-dir /var/lib/kvfs
fi
set -x
mkdir -p "$MNT/demo"
head -c 4M /dev/urandom > "$MNT/demo/layer.0"
cp "$MNT/demo/layer.0" "$MNT/demo/layer.1"
setfattr -n user.model -v demo "$MNT/demo/layer.0"
ls -l "$MNT" "$MNT/demo"
du -sh "$MNT/demo"
getfattr -d "$MNT/demo/layer.0"
cmp "$MNT/demo/layer.0" "$MNT/demo/layer.1"
df -h "$MNT"
$KVFS status "$MNT"
set +x
echo
echo "kvfs is mounted at $MNT. Unmount with: $KVFS umount $MNT"
