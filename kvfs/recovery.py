"""`kvfs recover`: rebuild etcd's metadata from the self-describing store objects."""

import logging
import sys
import time

from .errors import Corrupt, Exists, KvfsError, NotFound
from .meta import Meta
from .objects import (
    DATA_SUFFIX,
    HEADER_SIZE,
    block_checksum,
    data_offset,
    decode_header,
    decode_xattrs,
    encode_blocks,
    header_key,
    is_legacy,
    sums_of,
)
from .records import Entry, SessionInfo
from .store import Store

log = logging.getLogger(__name__)


class Progress:
    """A one-line progress bar on a terminal, periodic log lines elsewhere."""

    def __init__(self, what: str, total: int, stream=None):
        self.what = what
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        now = time.monotonic()
        if done < total and now - self.last < (0.1 if self.tty else 5):
            return
        self.last = now
        pct = 100 * done // max(total, 1)
        if self.tty:
            bar = "#" * (pct // 4)
            self.stream.write(f"\r{self.what} [{bar:<25}] {done}/{total}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info("%s: %d/%d (%d%%)", self.what, done, total, pct)


def scan(store: Store, progress=None) -> tuple[dict, list[str]]:
    """Read every object's header: ({(session, name): Entry}, unreadable keys)."""
    keys = list(store.list())
    best: dict[tuple, Entry] = {}
    bad: list[str] = []
    superseded: list[str] = []
    found: list[str] = []  # objects read whole
    for i, key in enumerate(keys):
        if progress:
            progress(i + 1, len(keys))
        if not (key.endswith(DATA_SUFFIX) or is_legacy(key)):
            continue  # a header: read with its data object
        try:
            if is_legacy(key):
                meta, offset, size = decode_header(store.get(key, 0, HEADER_SIZE))
                if offset != HEADER_SIZE:
                    raise Corrupt("unexpected data offset")
            else:
                try:
                    head = store.get(header_key(key))
                except NotFound:
                    # its file was deleted (the header goes first), or its
                    # commit never got that far: nothing to restore
                    superseded.append(key)
                    continue
                meta, _, size = decode_header(head)
            base = data_offset(key)
            st = store.stat(key)
            if st.size < base + size:
                raise Corrupt(f"truncated: {st.size - base} of {size} bytes")
            # the block sums live in etcd only: recompute them, and check the bytes
            reader = store.reader(key)
            try:
                sums = sums_of(lambda n, off, r=reader, b=base: r.pread(n, b + off), size)
            finally:
                reader.close()
            # an empty checksum: published before its sums were computed (and
            # the daemon stopped first); nothing to check the bytes against
            if meta["checksum"] and block_checksum(sums) != meta["checksum"]:
                raise Corrupt("bytes do not match the checksum in the header")
            e = Entry(
                session=meta["session"],
                name=meta["name"],
                size=int(meta["size"]),
                mtime_ns=int(meta["mtime_ns"]),
                ctime_ns=int(meta["ctime_ns"]),
                atime_ns=int(meta.get("atime_ns", 0)),
                object=key,
                version=str(meta["version"]),
                checksum=block_checksum(sums),
                store=store.url,
                blocks=encode_blocks(sums),
                mode=int(meta["mode"]),
                uid=int(meta["uid"]),
                gid=int(meta["gid"]),
                xattrs=decode_xattrs(meta.get("xattrs") or {}),
            )
        except (KvfsError, KeyError, ValueError, TypeError) as exc:
            log.warning("object %s skipped: %s", key, exc)
            bad.append(key)
            continue
        found.append(key)
        # a file with hard links: its header names every one of them
        names = [tuple(x) for x in meta.get("links") or ()] or [(e.session, e.name)]
        for k in names:
            old = best.get(k)
            # the newest commit of a name wins; its predecessors were being replaced
            if old is None or (e.ctime_ns, e.version) > (old.ctime_ns, old.version):
                best[k] = Entry(**{**e.__dict__, "session": k[0], "name": k[1], "links": names})
    winners = {e.object for e in best.values()}
    superseded += [key for key in found if key not in winners]
    for e in best.values():
        # names another file took later are no longer this file's
        e.links = [k for k in e.links if best[k].object == e.object]
        if len(e.links) < 2:
            e.links = []
    if progress and not keys:
        progress(0, 0)
    return best, bad + superseded


def recover(store: Store, meta: Meta, progress=None, delete_stale: bool = False) -> dict:
    """Publish every object found in STORE whose name etcd does not already hold."""
    best, stale = scan(store, progress)
    # on a live mount etcd is the truth: an object it already names (under
    # any name, e.g. after a rename) is never restored a second time
    referenced = {e.object for e in meta.iter_all_entries()}
    sessions: dict[str, SessionInfo] = {}
    for e in best.values():
        s = sessions.setdefault(e.session, SessionInfo(e.session, ctime_ns=e.ctime_ns))
        s.ctime_ns = min(s.ctime_ns, e.ctime_ns)
        s.mtime_ns = max(s.mtime_ns, e.mtime_ns)
    created = restored = kept = 0
    for s in sessions.values():
        try:
            meta.create_session(s)
            created += 1
        except Exists:
            pass
    for e in best.values():
        if e.object in referenced:
            kept += 1
            continue
        current = meta.get_entry(e.session, e.name)
        if current is not None:
            kept += 1  # etcd still knows this name: it is the truth
            continue
        try:
            meta.commit(e, expect_rev=0)
            restored += 1
        except KvfsError as exc:
            log.warning("could not restore %s/%s: %s", e.session, e.name, exc)
    if delete_stale:
        for key in stale:
            if key in referenced:
                continue
            store.delete(header_key(key))
            store.delete(key)
    return {
        "objects": len(best) + len(stale),
        "sessions_created": created,
        "entries_restored": restored,
        "entries_kept": kept,
        "stale_objects": len(stale),
    }
