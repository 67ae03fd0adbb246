"""The inode table: which kernel inode is which session, version or writer.

Every committed version of a file is its own inode (`VersionNode`), so its
size and pages never change under a reader. A process writing a name gets a
private `WriterNode`, found through its claim (session, name, process).
Lookup counts are kept here and only here: the kernel's lookups raise them,
`forget` lowers them, and a node with neither lookups nor open handles goes.
"""

import time
from dataclasses import dataclass, field

import pyfuse3

from ..errors import NotFound
from ..records import Entry

ROOT = pyfuse3.ROOT_INODE
CLAIM_TTL = 10.0  # seconds a writer inode waits for the open it was made for


@dataclass(eq=False, kw_only=True)
class Node:
    ino: int
    lookups: int = 0
    handles: int = 0


@dataclass(eq=False, kw_only=True)
class RootNode(Node):
    pass


@dataclass(eq=False, kw_only=True)
class SessionNode(Node):
    session: str


@dataclass(eq=False, kw_only=True)
class FileNode(Node):
    session: str
    name: str
    # How this inode's open files are served while any is open: "passthrough"
    # (the kernel reads and writes BACKING_ID's file itself) or "daemon". One
    # inode never mixes the two, nor two backing files (the kernel fails it).
    path: str | None = None
    backing_id: int = 0


@dataclass(eq=False, kw_only=True)
class VersionNode(FileNode):
    entry: Entry  # this version's metadata, kept current
    # every (session, name, version) it answers to: the names of a file with
    # hard links share one inode, so `ls -i`, `du` and `find -samefile` agree
    keys: set = field(default_factory=set)


@dataclass(eq=False, kw_only=True)
class WriterNode(FileNode):
    entry: Entry | None = None  # the version it replaces, if any
    owner: int = 0  # the process (tgid) it belongs to
    # the thread whose open made it: each thread writing a name gets its own
    # version, so concurrent writers of one name never mix (one whole wins)
    claimant: int = 0
    pinned: float = 0.0  # claimed at (monotonic) and not yet used by an open
    writers: list = field(default_factory=list)  # handles that write
    pending: object = None  # the PendingFile its writers share, made at the first change
    orphaned: bool = False  # its name was removed while open: it never commits
    # committed while the kernel still held its backing file (now the committed
    # object): no new open may write through it
    sealed: bool = False
    # the commit under way, if any: every other close of this writer waits for
    # it, so no close(2) returns before the bytes it wrote are published
    committing: object = None  # CommitInFlight

    def awaiting_open(self) -> bool:
        return bool(self.pinned) and time.monotonic() - self.pinned < CLAIM_TTL


class InodeTable:
    def __init__(self):
        # called with a FileNode the table lets go of (the kernel forgot it)
        self.on_free = None
        self.nodes: dict[int, Node] = {ROOT: RootNode(ino=ROOT, lookups=1)}
        self._sessions: dict[str, int] = {}
        self._versions: dict[tuple[str, str, str], int] = {}
        self._files: dict[str, int] = {}  # version -> its inode, whatever the name
        # (session, name) -> {claimant thread: writer ino}: a writer's lookup and the
        # "is anyone writing this name" checks are dict hits, not scans
        self._claims: dict[tuple[str, str], dict[int, int]] = {}
        # (thread, version inode) -> when: a writable open of a file with
        # several names was sent back (ESTALE) to learn its name at the lookup
        self._reopens: dict[tuple[int, int], float] = {}
        self._next_ino = ROOT + 1

    def get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino} is not known (forgotten)") from None

    def _add(self, cls, **kw) -> Node:
        node = cls(ino=self._next_ino, **kw)
        self._next_ino += 1
        self.nodes[node.ino] = node
        return node

    # -- the kernel's references --------------------------------------------------

    def looked_up(self, node: Node, n: int = 1) -> None:
        """The kernel now holds N more references to NODE (lookup, readdirplus, create)."""
        node.lookups += n

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped N references; never raises (the kernel cannot be told)."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups = max(0, node.lookups - n)
        self.maybe_free(node)

    def opened(self, node: Node) -> None:
        node.handles += 1

    def closed(self, node: Node) -> None:
        node.handles -= 1
        if isinstance(node, FileNode) and node.handles == 0:
            node.path = None  # the next open may choose afresh
        if isinstance(node, WriterNode) and not node.writers and not node.awaiting_open():
            # the writer is done: its process finds the committed version again
            self.drop_claim(node)
        self.maybe_free(node)

    def maybe_free(self, node: Node) -> None:
        if node.ino == ROOT or node.lookups > 0 or node.handles > 0:
            return
        if isinstance(node, WriterNode) and node.awaiting_open():
            # the kernel forgets the inode its ESTALE revalidation saw; the
            # open that follows still needs the claim
            return
        self.nodes.pop(node.ino, None)
        if isinstance(node, FileNode) and self.on_free is not None:
            self.on_free(node)
        if isinstance(node, SessionNode):
            if self._sessions.get(node.session) == node.ino:
                del self._sessions[node.session]
        elif isinstance(node, VersionNode):
            for key in node.keys:
                if self._versions.get(key) == node.ino:
                    del self._versions[key]
            if self._files.get(node.entry.version) == node.ino:
                del self._files[node.entry.version]
        elif isinstance(node, WriterNode):
            self.drop_claim(node)

    # -- sessions and versions ------------------------------------------------------

    def session(self, session: str) -> SessionNode:
        ino = self._sessions.get(session)
        if ino is None:
            node = self._add(SessionNode, session=session)
            self._sessions[session] = node.ino
            return node
        return self.nodes[ino]

    def session_names(self) -> list[str]:
        return list(self._sessions)

    def session_ino(self, session: str) -> int | None:
        return self._sessions.get(session)

    def version(self, entry: Entry) -> VersionNode:
        key = (entry.session, entry.name, entry.version)
        ino = self._versions.get(key)
        if ino is None and entry.links:
            # another name of a file the kernel already knows: the same inode
            ino = self._files.get(entry.version)
            if ino is not None:
                self._versions[key] = ino
                self.nodes[ino].keys.add(key)
        if ino is None:
            node = self._add(VersionNode, session=entry.session, name=entry.name, entry=entry)
            node.keys.add(key)
            self._versions[key] = node.ino
            self._files[entry.version] = node.ino
            return node
        node = self.nodes[ino]
        node.entry = entry  # the same version, maybe newer times or attributes
        return node

    def name_gone(self, session: str, name: str) -> None:
        """SESSION/NAME was removed: a file's inode answers to its other names only."""
        for key in [k for k in self._versions if k[0] == session and k[1] == name]:
            node = self.nodes.get(self._versions.pop(key))
            if not isinstance(node, VersionNode):
                continue
            node.keys.discard(key)
            if (node.session, node.name) == (session, name) and node.keys:
                node.session, node.name, _ = next(iter(node.keys))

    def file_ino(self, version: str) -> int | None:
        """The inode of version VERSION, by whichever name the kernel knows it."""
        return self._files.get(version)

    def bound_names(self) -> list[tuple[str, str, str]]:
        """(session, name, version) of every name the kernel may hold bound to a version."""
        return list(self._versions)

    def version_ino(self, session: str, name: str, version: str) -> int | None:
        return self._versions.get((session, name, version))

    def other_version_bound(self, session: str, name: str, keep: str | None) -> bool:
        """May the kernel hold SESSION/NAME bound to a version other than KEEP?"""
        return any(s == session and n == name and v != keep for s, n, v in self._versions)

    def versions_bound(self, session: str, name: str, keep: str | None) -> list[VersionNode]:
        """The inodes of versions other than KEEP that SESSION/NAME was bound to."""
        return [
            self.nodes[i]
            for (s, n, v), i in self._versions.items()
            if s == session and n == name and v != keep and i in self.nodes
        ]

    def moved(self, session: str, name: str, entry: Entry) -> None:
        """A rename moved version ENTRY.version from SESSION/NAME to ENTRY's name."""
        old = (session, name, entry.version)
        ino = self._versions.pop(old, None)
        if ino is not None and ino in self.nodes:
            node = self.nodes[ino]
            new = (entry.session, entry.name, entry.version)
            node.keys.discard(old)
            node.keys.add(new)
            node.session, node.name, node.entry = entry.session, entry.name, entry
            self._versions[new] = ino

    # -- writers and their claims ------------------------------------------------------

    def claim(
        self, session: str, name: str, claimant: int, owner: int, base: Entry | None
    ) -> WriterNode:
        """The writer inode for thread CLAIMANT's (of process OWNER) writes to SESSION/NAME."""
        owners = self._claims.setdefault((session, name), {})
        ino = owners.get(claimant)
        if ino is not None and ino in self.nodes:
            node = self.nodes[ino]
            if node.writers or node.awaiting_open():
                node.pinned = time.monotonic()  # another open is on its way
                return node
        node = self.new_writer(session, name, base, owner=owner)
        node.claimant = claimant
        node.pinned = time.monotonic()
        owners[claimant] = node.ino
        return node

    def expect_reopen(self, claimant: int, ino: int) -> None:
        now = time.monotonic()
        if len(self._reopens) > 1024:
            self._reopens = {k: t for k, t in self._reopens.items() if now - t < CLAIM_TTL}
        self._reopens[(claimant, ino)] = now

    def reopening(self, claimant: int, ino: int) -> bool:
        """Whether thread CLAIMANT's lookup that found inode INO retries its writable open."""
        t = self._reopens.pop((claimant, ino), None)
        return t is not None and time.monotonic() - t < CLAIM_TTL

    def new_writer(self, session: str, name: str, base: Entry | None, owner: int = 0):
        """A writer inode nobody can look up (truncate by path uses one)."""
        return self._add(WriterNode, session=session, name=name, entry=base, owner=owner)

    def claim_of(self, session: str, name: str, claimant: int) -> WriterNode | None:
        owners = self._claims.get((session, name))
        if not owners:
            return None
        ino = owners.get(claimant)
        return self.nodes.get(ino) if ino is not None else None

    def writer_of_process(self, session: str, name: str, owner: int) -> WriterNode | None:
        """A writer inode of SESSION/NAME that process OWNER (any thread) has open."""
        for node in self.writers_of(session, name):
            if node.owner == owner and node.writers:
                return node
        return None

    def drop_claim(self, node: WriterNode) -> None:
        key = (node.session, node.name)
        owners = self._claims.get(key)
        if owners and owners.get(node.claimant) == node.ino:
            del owners[node.claimant]
            if not owners:
                del self._claims[key]

    def move_claim(self, node: WriterNode, session: str, name: str) -> None:
        """NODE's process renamed its open file: its version now commits under SESSION/NAME."""
        self.drop_claim(node)
        node.session, node.name = session, name
        self._claims.setdefault((session, name), {})[node.claimant] = node.ino
        if node.pending is not None:
            node.pending.session, node.pending.name = session, name

    def writers_of(self, session: str, name: str) -> list[WriterNode]:
        owners = self._claims.get((session, name), {})
        return [self.nodes[i] for i in owners.values() if i in self.nodes]

    def claimed_names(self, session: str) -> list[str]:
        return [n for s, n in self._claims if s == session]
