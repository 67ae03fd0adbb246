"""A tiny FUSE passthrough filesystem over one flat directory, for tests.

Each open file gets the source file as its passthrough backing file when the
kernel and the patched pyfuse3 allow it, else the daemon serves the bytes
itself. The read and write requests that still reach the daemon are counted:
the root's `user.ptfs.stats` xattr holds them as JSON.

    python tests/ptfs.py SOURCE MOUNTPOINT [--no-passthrough] [--drop-sys-admin]
"""

import argparse
import ctypes
import errno
import functools
import itertools
import json
import os
from collections import Counter

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE


def fuse_errors(fn):
    """OSError from the source directory becomes the same errno for the caller."""

    @functools.wraps(fn)
    async def wrapper(*args):
        try:
            return await fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    return wrapper


class PassthroughFS(pyfuse3.Operations):
    def __init__(self, source: str, passthrough: bool):
        super().__init__()
        self.enable_passthrough = passthrough
        self.source = os.fsencode(source)
        self.names = {ROOT: b""}  # inode -> name; the root holds files only
        self.inodes = {}  # name -> inode, stable for the daemon's life
        self.next_inode = itertools.count(ROOT + 1)
        self.handles = {}  # fh -> (inode, fd)
        self.next_fh = itertools.count(1)
        # inode -> [backing id or 0, open count]: the kernel allows one backing
        # file per inode, so every open of an inode shares one registration
        self.backing = {}
        self.stats = Counter()

    def _path(self, inode):
        return os.path.join(self.source, self.names[inode])

    def _inode(self, name):
        if name not in self.inodes:
            self.inodes[name] = inode = next(self.next_inode)
            self.names[inode] = name
        return self.inodes[name]

    def _attr(self, inode):
        st = os.lstat(self._path(inode))
        entry = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks"):
            setattr(entry, field, getattr(st, field))
        entry.st_atime_ns, entry.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        entry.st_ino = inode
        entry.st_blksize = 4096
        entry.attr_timeout = entry.entry_timeout = 0  # the source may change under us
        return entry

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        os.lstat(os.path.join(self.source, name))
        return self._attr(self._inode(name))

    @fuse_errors
    async def getattr(self, inode, ctx):
        return self._attr(inode)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, attr.st_mode & 0o7777)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        names = sorted(os.listdir(self.source))
        for i, name in enumerate(names[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(self._inode(name)), i + 1):
                break

    @fuse_errors
    async def open(self, inode, flags, ctx):
        # read-write whatever this open asked for: later opens of the inode
        # share this backing file, and the kernel checked permissions already
        fd = os.open(self._path(inode), os.O_RDWR | (flags & os.O_TRUNC))
        return self._open_handle(inode, fd)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = os.path.join(self.source, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (flags & os.O_EXCL), mode & 0o7777)
        inode = self._inode(name)
        return self._open_handle(inode, fd), self._attr(inode)

    def _open_handle(self, inode, fd):
        fh = next(self.next_fh)
        self.handles[fh] = (inode, fd)
        if inode not in self.backing:
            backing_id = 0
            if pyfuse3.passthrough_enabled():
                try:
                    backing_id = pyfuse3.passthrough_open(fd)
                except OSError as exc:  # EPERM without CAP_SYS_ADMIN: serve it ourselves
                    self.stats["passthrough_open_" + errno.errorcode[exc.errno]] += 1
            self.backing[inode] = [backing_id, 0]
        b = self.backing[inode]
        b[1] += 1
        if b[0]:
            self.stats["passthrough_opens"] += 1
            # keep_cache stays at its default: the patch leaves it out of a
            # passthrough open, where the backing file's page cache serves
            return pyfuse3.FileInfo(fh=fh, backing_id=b[0])
        # no caching of our own, so every read reaches the daemon
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    @fuse_errors
    async def read(self, fh, off, size):
        self.stats["reads"] += 1
        return os.pread(self.handles[fh][1], size, off)

    @fuse_errors
    async def write(self, fh, off, buf):
        self.stats["writes"] += 1
        return os.pwrite(self.handles[fh][1], buf, off)

    @fuse_errors
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(self.handles[fh][1])

    @fuse_errors
    async def release(self, fh):
        inode, fd = self.handles.pop(fh)
        os.close(fd)
        b = self.backing[inode]
        b[1] -= 1
        if b[1] == 0:
            del self.backing[inode]
            if b[0]:
                pyfuse3.passthrough_close(b[0])

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(os.path.join(self.source, name))

    async def getxattr(self, inode, name, ctx):
        if inode != ROOT or name != b"user.ptfs.stats":
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        stats = dict(self.stats, passthrough=pyfuse3.passthrough_enabled())
        return json.dumps(stats).encode()


def drop_cap_sys_admin():
    """Drop CAP_SYS_ADMIN from this thread, which runs every handler (capset(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words
    cap_sys_admin = 1 << 21
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0] &= ~cap_sys_admin
    data[1] &= ~cap_sys_admin
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--no-passthrough", action="store_true", help="do not ask for it at init")
    parser.add_argument("--drop-sys-admin", action="store_true", help="after mounting")
    args = parser.parse_args()
    fs = PassthroughFS(args.source, passthrough=not args.no_passthrough)
    pyfuse3.init(fs, args.mountpoint, set(pyfuse3.default_options) | {"fsname=ptfs"})
    if args.drop_sys_admin:
        drop_cap_sys_admin()
    try:
        trio.run(pyfuse3.main)  # returns once `fusermount3 -u` ends the session
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
