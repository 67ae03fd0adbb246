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

from ..namespace import Namespace
from .inodes import FileNode
from .kernel import Kernel

log = logging.getLogger(__name__)


class Passthrough:
    def __init__(self, kernel: Kernel, ns: Namespace, wanted: bool):
        self.kernel = kernel
        self.ns = ns
        self.wanted = wanted
        self.refused: str | None = None  # why the kernel said no, once

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
        """NODE's last open file closed: the next open may choose afresh."""
        if node.backing_id:
            self.kernel.close_backing(node.backing_id)
            node.backing_id = 0
