"""The records kvfs keeps in etcd: a session, an entry (one version of a file), a change."""

import json
from dataclasses import dataclass, field, fields

from .objects import decode_xattrs, encode_xattrs

_DECODE = json.JSONDecoder().decode


@dataclass
class Entry:
    session: str
    name: str
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    # last read (touch-on-read) or an explicit atime: extends life without
    # rewriting the mtime a user or a copy tool set
    atime_ns: int = 0
    object: str = ""
    version: str = ""
    checksum: str = ""
    blocks: str = ""  # base64 of the per-block CRC32Cs (objects.BLOCK bytes each)
    store: str = ""
    # why a scrub found the stored bytes bad ("" = good): reads get EIO, the
    # connector a miss, until the name is written again
    bad: str = ""
    mode: int = 0o100644
    uid: int = 0
    gid: int = 0
    xattrs: dict = field(default_factory=dict)  # name -> bytes
    # Hard links: every name of a file with more than one, as [session, name]
    # pairs, the same list in each name's record (empty: this name only). A
    # file's attributes live in every one of its names' records, and a change
    # to the file rewrites them all in one transaction.
    links: list = field(default_factory=list)
    rev: int = 0  # etcd mod_revision; not stored

    @property
    def names(self) -> list[tuple[str, str]]:
        """Every name of this file, this one included."""
        if not self.links:
            return [(self.session, self.name)]
        return [(s, n) for s, n in self.links]

    @property
    def nlink(self) -> int:
        return max(1, len(self.links))

    @property
    def last_use_ns(self) -> int:
        """What expiry and LRU eviction go by: the later of mtime and atime."""
        return max(self.mtime_ns, self.atime_ns)

    def to_json(self) -> bytes:
        # field by field, not dataclasses.asdict (a deep copy: 4x the time of
        # the whole record, paid at every commit)
        d = {f: getattr(self, f) for f in _ENTRY_STORED}
        d["xattrs"] = encode_xattrs(self.xattrs)
        d["links"] = [list(p) for p in self.links]
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, session: str, name: str, raw: bytes, rev: int = 0) -> "Entry":
        # A listing parses every record of a session: a decoder made once and
        # a str (json.loads sniffs a bytes' encoding each call), and most
        # records have no attributes and one name: the empty cases skip their
        # conversions. 13 -> 9 us a record here.
        d = _DECODE(raw.decode() if isinstance(raw, bytes | bytearray) else raw)
        x = d.get("xattrs")
        d["xattrs"] = decode_xattrs(x) if x else {}
        links = d.get("links")
        d["links"] = [tuple(p) for p in links] if links else []
        return cls(session=session, name=name, rev=rev, **d)

    def renamed(self, session: str, name: str, **changes) -> "Entry":
        """This file's record under another of its names."""
        return Entry(**{**self.__dict__, "session": session, "name": name, **changes})


_ENTRY_STORED = tuple(f.name for f in fields(Entry) if f.name not in ("session", "name", "rev"))


@dataclass
class SessionInfo:
    name: str
    ctime_ns: int = 0
    mode: int = 0o040755
    uid: int = 0
    gid: int = 0
    xattrs: dict = field(default_factory=dict)
    # an index directory: its names do not keep a file alive (a file whose
    # only remaining names are in index directories is removed)
    index: bool = False
    mtime_ns: int = 0  # from t/SESSION
    rev: int = 0

    def to_json(self) -> bytes:
        d = {
            "ctime_ns": self.ctime_ns,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "xattrs": encode_xattrs(self.xattrs),
        }
        if self.index:
            d["index"] = True
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes, rev: int = 0) -> "SessionInfo":
        d = json.loads(raw)
        d["xattrs"] = decode_xattrs(d.get("xattrs", {}))
        return cls(name=name, rev=rev, **d)


@dataclass
class WatchEvent:
    kind: str  # "entry" | "session"
    session: str
    name: str | None  # entry name for kind == "entry"
    value: bytes | None  # None for a delete
    revision: int
