"""FUSE passthrough: which inodes the kernel serves from a backing file itself.

With passthrough the kernel sends read, write and mmap of an open file
straight to a file the daemon registered (a committed version's data object,
or a writer's staged file), never to the daemon. The kernel's rules: one
backing file per inode while any of its files is open, and no mixing of
passthrough and daemon-served opens on one inode (it fails them with EIO).
Where passthrough cannot be had (not asked for, the kernel or libfuse too
old, no CAP_SYS_ADMIN, a store that is not local files) the daemon serves.
"""

import logging
from collections import OrderedDict

from ..namespace import Namespace
from .inodes import FileNode, VersionNode
from .kernel import Kernel

log = logging.getLogger(__name__)


class Passthrough:
    def __init__(self, kernel: Kernel, ns: Namespace, wanted: bool, max_idle: int = 4096):
        self.kernel = kernel
        self.ns = ns
        self.wanted = wanted
        self.refused: str | None = None  # why the kernel said no, once
        # Committed versions whose last open file closed, still registered:
        # their object never changes, so the next open reuses the backing
        # file instead of opening the object and registering it again (a
        # thread trip and two ioctls, most of an open's cost). Bounded; the
        # oldest is let go, and so is one the kernel forgets.
        self.idle: OrderedDict[int, FileNode] = OrderedDict()
        self.max_idle = max_idle

    @property
    def on(self) -> bool:
        return self.wanted and self.refused is None and self.kernel.passthrough_granted()

    def state(self) -> str:
        if not self.wanted:
            return "off (--no-passthrough or --verify-reads)"
        if self.refused is not None:
            return f"refused: {self.refused}"
        return "on" if self.kernel.passthrough_granted() else "not offered by the kernel"

    def attach(self, node: FileNode, get_fd) -> bool:
        """Serve NODE by passthrough, registering GET_FD()'s file unless it has one.

        False when NODE must be served by the daemon: passthrough off, NODE
        already served by the daemon, or no local file (GET_FD() is None).
        """
        if not self.on or node.path == "daemon":
            return False
        self.idle.pop(node.ino, None)
        if not node.backing_id:
            fd = get_fd()
            if fd is None:
                return False
            try:
                node.backing_id = self.kernel.open_backing(fd)
            except OSError as exc:
                # privileges or stacking: the same for every file, so say it once
                self.refused = f"{exc.strerror} (errno {exc.errno})"
                log.warning("FUSE passthrough refused (%s): the daemon serves every byte", exc)
                return False
        node.path = "passthrough"
        self.ns.count("opens_passthrough")
        return True

    def served_by_daemon(self, node: FileNode) -> None:
        node.path = "daemon"
        self.ns.count("opens_daemon")

    def release(self, node: FileNode) -> None:
        """NODE's last open file closed: the next open may choose afresh.

        A committed version keeps its backing file for the next open (see
        `idle`); a writer's staged file is let go.
        """
        if not node.backing_id:
            return
        if isinstance(node, VersionNode) and self.on and self.ns.keeps_backing:
            self.idle[node.ino] = node
            self.idle.move_to_end(node.ino)
            while len(self.idle) > self.max_idle:
                _, old = self.idle.popitem(last=False)
                self._close(old)
            return
        self._close(node)

    def forgotten(self, node: FileNode) -> None:
        """The kernel forgot NODE: its kept backing file goes too."""
        if self.idle.pop(node.ino, None) is not None:
            self._close(node)

    def _close(self, node: FileNode) -> None:
        if node.backing_id:
            self.kernel.close_backing(node.backing_id)
            node.backing_id = 0
