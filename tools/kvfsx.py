#!/usr/bin/env python3
"""kvfsx: a seeded random-operation exerciser for one file, in the spirit of fsx.

It applies a random sequence of operations to FILE and to an in-memory model of
what FILE must contain, and checks every byte that comes back (pread, mmap, the
size from fstat) against the model. Written here from scratch so the suite
needs no C toolchain and no outside source.

    python3 tools/kvfsx.py FILE --seed N --ops N --maxlen BYTES
            [--oplen BYTES] [--no-mmap] [--no-reopen] [--no-fallocate]
            [--no-copy-range] [--quiet]

Exit 0 when every check passed, 1 on a mismatch or an unexpected error (the
tail of the op log, the first differing offset and the op that last touched
it are printed). From Python: `run(path, seed=..., ops=...)` raises
`KvfsxFailure` with the same text.

The sequence depends only on the seed and on which optional operations the
filesystem supports (an unsupported one is noted once, then left out).
"""

import argparse
import ctypes
import ctypes.util
import errno
import mmap
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

PAGE = mmap.PAGESIZE
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# errnos that mean "this filesystem does not do that operation", not "it broke"
UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    # os.posix_fallocate has no mode argument; KEEP_SIZE and PUNCH_HOLE need the raw call
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class KvfsxFailure(AssertionError):
    """The file disagreed with the model, or an operation failed unexpectedly."""


@dataclass
class Op:
    num: int
    name: str
    off: int = 0
    length: int = 0
    note: str = ""

    def covers(self, pos: int) -> bool:
        return self.off <= pos < self.off + self.length

    def __str__(self) -> str:
        span = f" 0x{self.off:x}..0x{self.off + self.length:x} (0x{self.length:x})"
        return f"#{self.num:<5} {self.name:<12}{span if self.length else ''} {self.note}".rstrip()


@dataclass
class Exerciser:
    path: str
    seed: int
    ops: int
    maxlen: int
    oplen: int
    use_mmap: bool = True
    use_reopen: bool = True
    use_fallocate: bool = True
    use_copy_range: bool = True
    say: Callable[[str], None] = print
    log: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.model = bytearray()
        self.fd = -1
        self.writable = False
        # fallocate modes are probed one by one: a store may keep sizes but not punch holes
        self.falloc_modes = [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE]

    # -- bookkeeping -------------------------------------------------------

    def record(self, name, off=0, length=0, note="") -> Op:
        op = Op(len(self.log) + 1, name, off, length, note)
        self.log.append(op)
        return op

    def fail(self, why: str, pos: int | None = None, tail: int = 30) -> None:
        lines = [f"kvfsx: seed {self.seed}: {why}"]
        if pos is not None:
            last = next((o for o in reversed(self.log[:-1]) if o.covers(pos)), None)
            lines.append(
                f"first bad offset 0x{pos:x} ({pos}); last op before this that touched it: {last or 'none'}"
            )
        lines.append(f"last {min(tail, len(self.log))} of {len(self.log)} ops:")
        lines += [f"  {o}" for o in self.log[-tail:]]
        raise KvfsxFailure("\n".join(lines))

    def unsupported(self, what: str, e: OSError) -> None:
        note = (
            f"{what}: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror}), skipped from now on"
        )
        self.notes.append(note)
        self.say(f"kvfsx: note: {note}")

    def compare(self, got: bytes, off: int, what: str) -> None:
        want = bytes(self.model[off : off + len(got)])
        if got != want:
            i = next(
                (k for k in range(min(len(got), len(want))) if got[k] != want[k]),
                min(len(got), len(want)),
            )
            self.fail(
                f"{what}: bytes differ at 0x{off + i:x}: "
                f"got {got[i : i + 16].hex()} want {want[i : i + 16].hex()}",
                off + i,
            )

    def check_size(self, what: str) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"after {what}: fstat size 0x{size:x}, model 0x{len(self.model):x}")

    def set_len(self, n: int) -> None:
        if n < len(self.model):
            del self.model[n:]
        else:
            self.model.extend(bytes(n - len(self.model)))

    def span(self, within: int | None = None) -> tuple[int, int]:
        """A random (offset, length) with offset+length <= maxlen (or <= within)."""
        limit = self.maxlen if within is None else within
        off = self.rng.randrange(limit)
        return off, self.rng.randint(1, min(self.oplen, limit - off))

    # -- the file ----------------------------------------------------------

    def open(self, writable: bool = True, create: bool = False) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (
            os.O_CREAT | os.O_TRUNC if create else 0
        )
        self.fd = os.open(self.path, flags, 0o644)
        self.writable = writable

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def need_writable(self) -> None:
        # an O_RDONLY descriptor from a reopen: switch back before changing anything
        if not self.writable:
            self.record("reopen", note="O_RDWR (to write)")
            self.close()
            self.open(writable=True)

    # -- operations --------------------------------------------------------

    def op_write(self):
        self.need_writable()
        off, n = self.span()
        data = self.rng.randbytes(n)
        self.record("write", off, n, "past EOF" if off > len(self.model) else "")
        done = 0
        while done < n:
            w = os.pwrite(self.fd, data[done:], off + done)
            if w <= 0:
                self.fail(f"pwrite returned {w} with {n - done} bytes left")
            done += w
        if off + n > len(self.model):
            self.set_len(off + n)
        self.model[off : off + n] = data
        self.check_size("write")

    def op_read(self):
        size = len(self.model)
        # sometimes read across or beyond EOF: the answer must stop at the size
        off, n = self.span(max(size, 1) + self.oplen // 4)
        self.record("read", off, n)
        got = os.pread(self.fd, n, off)
        want = max(0, min(n, size - off))
        if len(got) != want:
            self.fail(f"short read: 0x{len(got):x} bytes instead of 0x{want:x}", off + len(got))
        self.compare(got, off, "read")

    def op_truncate(self):
        self.need_writable()
        n = self.rng.randrange(self.maxlen + 1)
        old = len(self.model)
        # the op "touches" the bytes between the two sizes (cut off, or zeroes appear)
        lo, hi = sorted((old, n))
        self.record("truncate", lo, hi - lo, f"0x{old:x} -> 0x{n:x}")
        os.ftruncate(self.fd, n)
        self.set_len(n)
        self.check_size("truncate")

    def op_mapread(self):
        size = len(self.model)
        if size == 0:
            return self.op_read()
        off, n = self.span(size)
        self.record("mapread", off, n)
        base = off - off % PAGE
        with mmap.mmap(self.fd, off + n - base, mmap.MAP_SHARED, mmap.PROT_READ, offset=base) as m:
            got = m[off - base : off - base + n]
        self.compare(got, off, "mapread")

    def op_mapwrite(self):
        self.need_writable()
        off, n = self.span()
        data = self.rng.randbytes(n)
        grow = off + n > len(self.model)
        sync = self.rng.random() < 0.5
        note = ("grown by truncate first" if grow else "") + (" msync" if sync else "")
        self.record("mapwrite", off, n, note.strip())
        if grow:
            # a mapping cannot extend a file: the size must exist before the pages are touched
            os.ftruncate(self.fd, off + n)
            self.set_len(off + n)
        base = off - off % PAGE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        with mmap.mmap(self.fd, off + n - base, mmap.MAP_SHARED, prot, offset=base) as m:
            m[off - base : off - base + n] = data
            if sync:
                m.flush()
        self.model[off : off + n] = data
        self.check_size("mapwrite")

    def op_reopen(self):
        writable = self.rng.random() < 0.5
        self.record("reopen", note="O_RDWR" if writable else "O_RDONLY")
        self.close()
        self.open(writable=writable)
        self.check_size("reopen")

    def op_fsync(self):
        data_only = self.rng.random() < 0.5
        self.record("fdatasync" if data_only else "fsync")
        (os.fdatasync if data_only else os.fsync)(self.fd)

    def op_fallocate(self):
        if not self.falloc_modes:
            return self.op_read()
        self.need_writable()
        mode = self.rng.choice(self.falloc_modes)
        off, n = self.span()
        name = {0: "falloc", 1: "falloc_keep", 3: "punch_hole"}[mode]
        self.record(name, off, n)
        try:
            fallocate(self.fd, mode, off, n)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self.falloc_modes.remove(mode)
            self.unsupported(f"fallocate mode {name}", e)
            return
        if mode == 0 and off + n > len(self.model):
            self.set_len(off + n)
        elif mode & FALLOC_FL_PUNCH_HOLE:
            end = min(off + n, len(self.model))
            if off < end:
                self.model[off:end] = bytes(end - off)
        self.check_size(name)

    def op_copy_range(self):
        size = len(self.model)
        if not self.use_copy_range or size < 2:
            return self.op_read()
        self.need_writable()
        # same file, source and destination must not overlap (the kernel refuses that)
        src, n = self.span(size)
        dst = self.rng.randrange(self.maxlen - n + 1)
        if dst < src + n and src < dst + n:
            return self.op_read()
        self.record("copy_range", dst, n, f"from 0x{src:x}")
        done = 0
        try:
            while done < n:
                c = os.copy_file_range(self.fd, self.fd, n - done, src + done, dst + done)
                if c == 0:
                    # the source lies within the size: 0 here means a bug, not EOF
                    self.fail(f"copy_file_range returned 0 with 0x{n - done:x} bytes left")
                done += c
        except OSError as e:
            if e.errno not in UNSUPPORTED or done:
                raise
            self.use_copy_range = False
            self.unsupported("copy_file_range", e)
            return
        data = bytes(self.model[src : src + n])
        if dst + n > len(self.model):
            self.set_len(dst + n)
        self.model[dst : dst + n] = data
        self.check_size("copy_range")

    # -- driver ------------------------------------------------------------

    def table(self):
        ops = [
            (self.op_write, 20),
            (self.op_read, 20),
            (self.op_truncate, 6),
            (self.op_fsync, 3),
            (self.op_copy_range, 4),
        ]
        if self.use_mmap:
            ops += [(self.op_mapread, 10), (self.op_mapwrite, 10)]
        if self.use_reopen:
            ops += [(self.op_reopen, 6)]
        if self.use_fallocate:
            ops += [(self.op_fallocate, 5)]
        return [f for f, _ in ops], [w for _, w in ops]

    def final_check(self):
        self.record("final", note="close, reopen O_RDONLY, read it all")
        self.close()
        self.open(writable=False)
        self.check_size("final reopen")
        got = bytearray()
        while len(got) < len(self.model) + 1:
            chunk = os.pread(self.fd, len(self.model) + 1 - len(got), len(got))
            if not chunk:
                break
            got += chunk
        if len(got) != len(self.model):
            self.fail(f"final read: 0x{len(got):x} bytes, model 0x{len(self.model):x}", len(got))
        self.compare(bytes(got), 0, "final read")
        self.close()

    def run(self) -> "Exerciser":
        funcs, weights = self.table()
        self.record("create", note=f"seed={self.seed} maxlen=0x{self.maxlen:x}")
        self.open(writable=True, create=True)
        try:
            for _ in range(self.ops):
                op = self.rng.choices(funcs, weights)[0]
                try:
                    op()
                except OSError as e:
                    self.fail(f"{self.log[-1].name} failed: {e!r}")
            self.final_check()
        finally:
            self.close()
        return self


def run(
    path,
    seed: int = 1,
    ops: int = 1000,
    maxlen: int = 256 * 1024,
    oplen: int | None = None,
    mmap: bool = True,
    reopen: bool = True,
    fallocate: bool = True,
    copy_range: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> list[str]:
    """Exercise `path`; return the notes (skipped operations). Raises KvfsxFailure."""
    x = Exerciser(
        path=os.fspath(path),
        seed=seed,
        ops=ops,
        maxlen=maxlen,
        oplen=oplen or min(maxlen, 64 * 1024),
        use_mmap=mmap,
        use_reopen=reopen,
        use_fallocate=fallocate,
        use_copy_range=copy_range,
        say=say,
    )
    return x.run().notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--maxlen", type=int, default=256 * 1024, help="largest file size")
    p.add_argument("--oplen", type=int, default=None, help="largest single op (64 KiB)")
    p.add_argument("--no-mmap", action="store_true")
    p.add_argument("--no-reopen", action="store_true")
    p.add_argument("--no-fallocate", action="store_true")
    p.add_argument("--no-copy-range", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.maxlen < 1:
        p.error("--maxlen must be at least 1")
    say = (lambda s: None) if a.quiet else (lambda s: print(s, flush=True))
    try:
        notes = run(
            a.file,
            seed=a.seed,
            ops=a.ops,
            maxlen=a.maxlen,
            oplen=a.oplen,
            mmap=not a.no_mmap,
            reopen=not a.no_reopen,
            fallocate=not a.no_fallocate,
            copy_range=not a.no_copy_range,
            say=say,
        )
    except KvfsxFailure as e:
        print(e, file=sys.stderr, flush=True)
        return 1
    say(f"kvfsx: seed {a.seed}: {a.ops} ops OK" + (f" ({len(notes)} skipped)" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
