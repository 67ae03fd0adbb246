"""Extended attributes: `user.kvfs.*` computed (read-only), other `user.*` stored."""

import errno

import pyfuse3

from ..errors import KvfsError, NotFound, NotPermitted
from ..namespace import Namespace, check_xattr_room
from ..records import Entry, SessionInfo
from .inodes import RootNode, SessionNode, VersionNode, WriterNode
from .writes import Writes

COMPUTED = "user.kvfs."
CONTROL = b"user.kvfs.control."
# set to 1 on a session directory: it becomes an index, whose names do not
# keep a file alive (see Namespace._drop_name)
INDEX_XATTR = b"user.kvfs.index"
XATTR_NAME_MAX = 255


def check_xattr_name(name: bytes) -> str | None:
    """The settable user attribute NAME as str; None for a computed one; else an errno.

    Computed attributes (`user.kvfs.*`) are kvfs's to say: setting or
    removing one changes nothing and is not an error, so that `cp -a`,
    `mv` and `rsync -aX` can copy a file with its attributes.
    """
    if len(name) > XATTR_NAME_MAX:
        raise pyfuse3.FUSEError(errno.ERANGE)
    key = name.decode("utf-8", "surrogateescape")
    if key.startswith(COMPUTED):
        return None
    if not key.startswith("user.") or key == "user.":
        raise pyfuse3.FUSEError(errno.ENOTSUP)
    return key


class Xattrs:
    def __init__(self, ns: Namespace, writes: Writes, status_fn=None, passthrough_fn=None):
        self.ns = ns
        self.writes = writes
        self.status_fn = status_fn
        self.passthrough_fn = passthrough_fn

    async def file_entry(self, node: VersionNode) -> Entry:
        """The metadata a version's inode shows, kept current."""
        current = await self.ns.get_entry(node.session, node.name)
        if current is not None and current.version == node.entry.version:
            node.entry = current
        return node.entry

    async def computed(self, node) -> dict[str, bytes]:
        if isinstance(node, RootNode):
            out = {"user.kvfs.store": self.ns.store_url.encode()}
            if self.passthrough_fn is not None:
                # the connector skips readahead hints the kernel would send here
                out["user.kvfs.passthrough"] = self.passthrough_fn().encode()
            if self.status_fn is not None:
                out["user.kvfs.status"] = self.status_fn().encode()
            return out
        if isinstance(node, SessionNode):
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            entries = await self.ns.list_entries(node.session)
            out = {
                "user.kvfs.ctime": str(info.ctime_ns).encode(),
                "user.kvfs.files": str(len(entries)).encode(),
                "user.kvfs.size": str(sum(e.size for e in entries)).encode(),
            }
            return out | ({"user.kvfs.index": b"1"} if info.index else {})
        if isinstance(node, WriterNode):
            p = node.pending
            size = p.size if p is not None else node.entry.size if node.entry else 0
            return {"user.kvfs.size": str(size).encode()}
        entry = await self.file_entry(node)
        out = {"user.kvfs.quarantined": entry.bad.encode()} if entry.bad else {}
        if entry.links:
            # every name of the file, one per line
            out["user.kvfs.links"] = "\n".join(f"{s}/{n}" for s, n in entry.links).encode()
        if entry.checksum:  # a large file's appears moments after its commit
            out["user.kvfs.checksum"] = entry.checksum.encode()
        return out | {
            "user.kvfs.size": str(entry.size).encode(),
            "user.kvfs.ctime": str(entry.ctime_ns).encode(),
            "user.kvfs.mtime": str(entry.mtime_ns).encode(),
            "user.kvfs.store": entry.store.encode(),
            "user.kvfs.object": entry.object.encode(),
            "user.kvfs.version": entry.version.encode(),
        }

    async def user(self, node) -> dict[str, bytes]:
        if isinstance(node, RootNode):
            return {}
        if isinstance(node, SessionNode):
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            return info.xattrs
        if isinstance(node, WriterNode):
            if node.pending is not None:
                return node.pending.xattrs
            return node.entry.xattrs if node.entry else {}
        return (await self.file_entry(node)).xattrs

    async def get(self, node, name: bytes) -> bytes:
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith(COMPUTED):
            values = await self.computed(node)
        elif key.startswith("user."):
            values = await self.user(node)
        else:
            # kvfs keeps no security labels and no POSIX ACLs: say so as a
            # filesystem without them does. `ls -l` then asks once per mount
            # instead of twice per file (it remembers a device that answered
            # ENOTSUP), which is most of a big listing's time.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if key not in values:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return values[key]

    async def names(self, node) -> list[bytes]:
        names = list(await self.computed(node)) + list(await self.user(node))
        return [n.encode() for n in names]

    async def mark_index(self, node: SessionNode, value: bytes) -> None:
        if value.strip() not in (b"0", b"1"):
            raise KvfsError("user.kvfs.index takes 1 (an index directory) or 0", errno.EINVAL)
        on = value.strip() == b"1"

        def mutate(info: SessionInfo):
            info.index = on

        await self.ns.update_session(node.session, mutate)

    async def change(self, node, change) -> Entry | None:
        """Apply CHANGE (a function of the attribute dict) to NODE's user attributes.

        Returns a version's new entry.
        """
        if isinstance(node, RootNode):
            raise NotPermitted("the root has no user attributes")
        if isinstance(node, SessionNode):

            def mutate_s(info: SessionInfo):
                change(info.xattrs)
                check_xattr_room(info.xattrs)

            await self.ns.update_session(node.session, mutate_s)
            return None
        if isinstance(node, WriterNode):
            # attributes set while writing commit with the bytes
            if not node.writers:
                raise KvfsError("the writer has closed the file", errno.ESTALE)
            await self.writes.ensure_pending(node)
            x = dict(node.pending.xattrs)
            change(x)
            check_xattr_room(x)
            node.pending.xattrs = x
            return None

        def mutate(e: Entry):
            change(e.xattrs)

        return await self.ns.update_entry(node.session, node.name, mutate)
