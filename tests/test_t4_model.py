"""Bad input and random operation sequences, checked against a model filesystem."""

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvfstest import wait_for

SESSIONS = st.sampled_from(["a", "b", "c"])
NAMES = st.sampled_from(["l0", "l1", "l2", "k.v"])
DATA = st.binary(max_size=3000)


class FsModel(RuleBasedStateMachine):
    """What a filesystem of sessions and files must do, next to the real mount.

    Names point at files, so hard links behave as on any filesystem: a write
    through one name is read through all; rename and unlink act on names.
    """

    root = None

    def __init__(self):
        super().__init__()
        for entry in os.listdir(self.root):
            shutil.rmtree(self.root / entry)
        self.model: dict[str, dict[str, int]] = {}  # session -> name -> file
        self.files: dict[int, bytes] = {}
        self.next_file = 0

    def _expect(self, fn, err):
        """Run FN; it must fail with ERR when ERR is set, else succeed."""
        if err is None:
            fn()
            return
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == err

    def _set(self, s, n, data):
        """The bytes of S/N after a write through it: its file's, or a new file's."""
        if n in self.model[s]:
            self.files[self.model[s][n]] = data
        else:
            self.next_file += 1
            self.files[self.next_file] = data
            self.model[s][n] = self.next_file

    @rule(s=SESSIONS)
    def mkdir(self, s):
        self._expect(lambda: os.mkdir(self.root / s), errno.EEXIST if s in self.model else None)
        self.model.setdefault(s, {})

    @rule(s=SESSIONS)
    def rmdir(self, s):
        err = (
            None
            if s in self.model and not self.model[s]
            else (errno.ENOENT if s not in self.model else errno.ENOTEMPTY)
        )
        self._expect(lambda: os.rmdir(self.root / s), err)
        if err is None:
            del self.model[s]

    @rule(s=SESSIONS, n=NAMES, data=DATA)
    def write(self, s, n, data):
        self._expect(
            lambda: (self.root / s / n).write_bytes(data), None if s in self.model else errno.ENOENT
        )
        if s in self.model:
            self._set(s, n, data)

    @rule(s=SESSIONS, n=NAMES, data=DATA)
    def append(self, s, n, data):
        def go():
            with open(self.root / s / n, "ab") as f:
                f.write(data)

        self._expect(go, None if s in self.model else errno.ENOENT)
        if s in self.model:
            old = self.files[self.model[s][n]] if n in self.model[s] else b""
            self._set(s, n, old + data)

    @rule(s=SESSIONS, n=NAMES, size=st.integers(0, 4000))
    def truncate(self, s, n, size):
        exists = n in self.model.get(s, {})
        self._expect(lambda: os.truncate(self.root / s / n, size), None if exists else errno.ENOENT)
        if exists:
            old = self.files[self.model[s][n]]
            self._set(s, n, old[:size] + bytes(max(0, size - len(old))))

    @rule(s=SESSIONS, n=NAMES, s2=SESSIONS, n2=NAMES)
    def rename(self, s, n, s2, n2):
        exists = n in self.model.get(s, {})
        err = None if exists and s2 in self.model else errno.ENOENT
        self._expect(lambda: os.rename(self.root / s / n, self.root / s2 / n2), err)
        # onto another name of the same file: rename(2) does nothing
        if err is None and self.model[s2].get(n2) != self.model[s][n]:
            self.model[s2][n2] = self.model[s].pop(n)

    @rule(s=SESSIONS, n=NAMES, s2=SESSIONS, n2=NAMES)
    def link(self, s, n, s2, n2):
        exists = n in self.model.get(s, {})
        if not exists or s2 not in self.model:
            err = errno.ENOENT
        else:
            err = errno.EEXIST if n2 in self.model[s2] else None
        self._expect(lambda: os.link(self.root / s / n, self.root / s2 / n2), err)
        if err is None:
            self.model[s2][n2] = self.model[s][n]

    @rule(s=SESSIONS, n=NAMES)
    def unlink(self, s, n):
        exists = n in self.model.get(s, {})
        self._expect(lambda: os.unlink(self.root / s / n), None if exists else errno.ENOENT)
        if exists:
            del self.model[s][n]

    @invariant()
    def same_tree(self):
        assert sorted(os.listdir(self.root)) == sorted(self.model)
        names = [(s, n, f) for s, files in self.model.items() for n, f in files.items()]
        inodes = {}
        for s, files in self.model.items():
            assert sorted(os.listdir(self.root / s)) == sorted(files)
        for s, n, f in names:
            data = self.files[f]
            st_ = os.stat(self.root / s / n)
            assert (self.root / s / n).read_bytes() == data, (s, n)
            assert st_.st_size == len(data)
            assert st_.st_nlink == sum(1 for _, _, g in names if g == f), (s, n)
            # the names of one file share its inode, and only they do
            assert inodes.setdefault(f, st_.st_ino) == st_.st_ino, (s, n)
        assert len(set(inodes.values())) == len(inodes)


def test_random_operations_match_the_model(kvfs_mount):
    FsModel.root = kvfs_mount.path
    run_state_machine_as_test(
        FsModel,
        settings=settings(
            max_examples=100,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_bad_input_leaves_the_tree_unchanged(kvfs_mount):
    root = kvfs_mount.path
    (root / "s").mkdir()
    (root / "s" / "f").write_bytes(b"data")
    before = {p.name: p.read_bytes() for p in (root / "s").iterdir()}
    rb = os.fsencode(root)
    cases = [
        (lambda: os.mkdir(rb + b"/" + b"x" * 256), errno.ENAMETOOLONG),
        (lambda: os.mkdir(rb + b"/s/deep"), errno.EPERM),
        (lambda: os.mkdir(rb + b"/bad\xff"), errno.EINVAL),
        (lambda: open(rb + b"/s/" + b"y" * 300, "wb"), errno.ENAMETOOLONG),
        (lambda: open(rb + b"/s/missing/x", "wb"), errno.ENOENT),
        (lambda: os.setxattr(root / "s" / "f", "user." + "n" * 260, b"v"), errno.ERANGE),
        (lambda: os.setxattr(root / "s" / "f", "user.v", b"v" * 70000), errno.E2BIG),
        (lambda: os.symlink("f", root / "s" / "sym"), errno.EPERM),
        (lambda: os.link(root / "s" / "f", root / "s" / "f"), errno.EEXIST),
        (lambda: os.link(root / "s" / "f", root / "nosession" / "f"), errno.ENOENT),
        (lambda: os.link(root / "s", root / "s" / "dir"), errno.EPERM),
        (lambda: os.rename(root / "s", root / "t"), errno.EXDEV),
        (lambda: os.rmdir(root / "s"), errno.ENOTEMPTY),
        (lambda: os.unlink(root / "s"), errno.EISDIR),
    ]
    for i, (fn, err) in enumerate(cases):
        with pytest.raises(OSError) as e:
            fn()
            pytest.fail(f"case {i} did not fail")
        assert e.value.errno == err, (i, e.value)
    assert {p.name: p.read_bytes() for p in (root / "s").iterdir()} == before
    # a computed attribute cannot be forged: setting it changes nothing
    checksum = os.getxattr(root / "s" / "f", "user.kvfs.checksum")
    os.setxattr(root / "s" / "f", "user.kvfs.checksum", b"forged")
    assert os.getxattr(root / "s" / "f", "user.kvfs.checksum") == checksum
    assert os.listxattr(root / "s" / "f") == [
        n for n in os.listxattr(root / "s" / "f") if n.startswith("user.kvfs.")
    ]


def test_file_opened_many_times(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    (p / "f").write_bytes(b"0123456789" * 1000)
    files = [open(p / "f", "rb") for _ in range(300)]
    try:
        for i, f in enumerate(files):
            f.seek(i % 10000)
            assert f.read(5) == (b"0123456789" * 1000)[i % 10000 : i % 10000 + 5]
    finally:
        for f in files:
            f.close()
    assert kvfs_mount.status()["counters"]["files_read"] >= 300


READER = """
import sys, time
root, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = {bytes([i]) * (50_000 + i) for i in range(6)}
bad = reads = 0
end = time.monotonic() + secs
while time.monotonic() < end:
    for k in range(n):
        try:
            with open(f"{root}/s/f{k}", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        reads += 1
        if data not in ok:
            bad += 1
            sys.stderr.write(f"BAD f{k} len={len(data)} bytes={set(data)}\\n")
print(reads, bad)
"""


def test_concurrent_writers_and_readers_two_mounts(make_mount, tmp_path):
    """Other processes only ever read whole committed versions, on either node."""
    a = make_mount(store=tmp_path / "shared")
    b = make_mount(store=tmp_path / "shared")
    (a.path / "s").mkdir()
    errors = []
    secs = 6.0
    stop = time.monotonic() + secs

    def writer(m, seed):
        i = seed
        while time.monotonic() < stop:
            try:
                (m.path / "s" / f"f{i % 3}").write_bytes(bytes([i % 6]) * (50_000 + i % 6))
            except OSError as exc:
                errors.append(("write", exc))
            i += 1

    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(m.path), "3", str(secs)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for m in (a, b, b)
    ]
    threads = [threading.Thread(target=writer, args=(m, s)) for m, s in ((a, 0), (b, 1), (a, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    results = [tuple(map(int, r.communicate(timeout=60)[0].split())) for r in readers]
    assert errors == []
    assert all(reads > 0 and bad == 0 for reads, bad in results), results
    wait_for(
        lambda: all(
            (a.path / "s" / f"f{k}").read_bytes() == (b.path / "s" / f"f{k}").read_bytes()
            for k in range(3)
        ),
        10,
        0.1,
        what="both mounts showing the same last versions",
    )
