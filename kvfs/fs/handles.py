"""Open file handles: what each open reads or writes."""

from dataclasses import dataclass, field

import trio

from ..records import Entry
from .inodes import Node


@dataclass(eq=False)
class Handle:
    """One open file description (a `fh`); writers share their inode's PendingFile."""

    fh: int
    node: Node
    writable: bool
    entry: Entry | None = None  # the version this handle reads
    reader: object = None  # the store's reader of that version (daemon path)
    passthrough: bool = False  # the kernel serves its reads and writes
    owner: int = 0  # process (tgid) that opened it
    flushed: bool = False  # close(2) was called on some descriptor of it
    released: trio.Event = field(default_factory=trio.Event)
    sums: list | None = None  # the version's block CRC32Cs, decoded on first read


class HandleTable:
    def __init__(self):
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    def new(self, node: Node, writable: bool, owner: int = 0) -> Handle:
        h = Handle(self._next_fh, node, writable, owner=owner)
        self._next_fh += 1
        self._handles[h.fh] = h
        return h

    def get(self, fh: int) -> Handle | None:
        return self._handles.get(fh)

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)

    def __len__(self) -> int:
        return len(self._handles)
