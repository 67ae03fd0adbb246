"""What kvfs tells the kernel: cache invalidations, and directory replies.

Behind one small class so the operations can run without a kernel (the
`t3_ops` tests hand them a recording fake).
"""

import errno
import logging

import pyfuse3
import trio

log = logging.getLogger(__name__)


class Kernel:
    """The live FUSE session's notifications."""

    def __init__(self, queue_size: int = 100_000):
        self._send, self._recv = trio.open_memory_channel(queue_size)
        self.dropped = 0

    def invalidate_entry(self, parent: int, name: str) -> None:
        """Queue "look PARENT/NAME up again"; a background task sends it."""
        self._queue(("entry", parent, name.encode()))

    def invalidate_inode(self, ino: int) -> None:
        """Queue "drop the attributes and pages of INO"."""
        self._queue(("inode", ino, True))

    def _queue(self, item) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
            log.warning("kernel invalidation queue full; dropped %s", item)

    async def forget_entry_now(self, parent: int, name: str) -> None:
        """Invalidate PARENT/NAME and return once the kernel has dropped it.

        Only from handlers that do not hold the directory's lock (close,
        release, setattr): the kernel takes it to drop the name.
        """
        await trio.to_thread.run_sync(self._send_one, "entry", parent, name.encode())

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        # Sent from a thread: the kernel may wait for requests we are serving.
        task_status.started()
        async for kind, *args in self._recv:
            await trio.to_thread.run_sync(self._send_one, kind, *args)

    @staticmethod
    def _send_one(kind, *args) -> None:
        fn = pyfuse3.invalidate_inode if kind == "inode" else pyfuse3.invalidate_entry
        try:
            fn(*args)
        except OSError as exc:
            # the kernel no longer knows it: nothing to drop
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.debug("invalidate %s%s: %s", kind, args, exc)

    @staticmethod
    def readdir_reply(token, name: bytes, attr, next_id: int) -> bool:
        return pyfuse3.readdir_reply(token, name, attr, next_id)

    # -- FUSE passthrough ----------------------------------------------------------

    @staticmethod
    def passthrough_granted() -> bool:
        """Did the kernel agree to passthrough at init? (a pyfuse3 without the
        patch, an old libfuse or kernel: no)"""
        granted = getattr(pyfuse3, "passthrough_enabled", None)
        return bool(granted and granted())

    @staticmethod
    def open_backing(fd: int) -> int:
        """Register FD's file as a backing file; its id goes in the open reply.

        Raises OSError (EPERM without CAP_SYS_ADMIN, ELOOP on a stacked file
        system too deep): the caller serves the file itself instead.
        """
        return pyfuse3.passthrough_open(fd)

    @staticmethod
    def close_backing(backing_id: int) -> None:
        try:
            pyfuse3.passthrough_close(backing_id)
        except OSError as exc:  # open files keep their own reference: nothing is lost
            log.debug("closing backing id %d: %s", backing_id, exc)
