"""etcd failing under a live mount: black-holed, reset and slow connections.

A TCP proxy (tests/etcdproxy.py) sits between one mount and the test etcd. While
it misbehaves the daemon must stay alive and every operation must end promptly,
with success or an errno; once it passes traffic again everything works without
a remount, and the watch keeps the mount coherent with another node's writes.
"""

import os
import subprocess
import sys
import time

import pytest
from etcdproxy import EtcdProxy

from kvfstest import _alive, wait_for

# One operation may make a few etcd calls of 3 s (the default etcd timeout)
# each before it gives up; anything longer is a hang.
PROMPT = 15.0

# Runs one file operation in a child, so that a hung FUSE request can be
# killed by the timeout instead of hanging the test run.
_OP = r"""
import errno, os, sys
kind, path, data = sys.argv[1], sys.argv[2], sys.argv[3].encode()
try:
    if kind == "ls":
        os.listdir(path)
    elif kind == "stat":
        os.stat(path)
    elif kind == "write":
        with open(path, "wb") as f:
            f.write(data)
    elif kind == "read":
        with open(path, "rb") as f:
            sys.stdout.write(f.read().decode())
    print()
    print("ok")
except OSError as e:
    print()
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def op(kind: str, path, data: str = "", timeout: float = PROMPT + 10):
    """(outcome, output, seconds): outcome is "ok", an errno name, or "HANG"."""
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-c", _OP, kind, str(path), data],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "HANG", "", time.monotonic() - t0
    lines = r.stdout.rsplit("\n", 2)
    outcome = lines[-2] if len(lines) >= 2 else f"rc={r.returncode}: {r.stderr[-500:]}"
    return outcome, lines[0] if len(lines) >= 3 else "", time.monotonic() - t0


def assert_prompt(results):
    for what, (outcome, _, secs) in results.items():
        print(f"{what}: {outcome} in {secs:.1f}s")
        assert outcome != "HANG" and secs < PROMPT, f"{what}: {outcome} after {secs:.1f}s"
        assert outcome == "ok" or outcome.startswith("E"), f"{what}: {outcome}"


def assert_alive(m):
    assert _alive(m.pid), f"the daemon died:\n{m.log()[-3000:]}"
    assert os.path.ismount(m.path), "the mount is gone"


def recovers(m, other, tag: str):
    """After the fault: a write/read round-trips, the watch is up again, and a
    file replaced on another node is seen here (only the watch tells us)."""
    wait_for(
        lambda: op("write", m.path / "s" / f"after-{tag}", tag)[0] == "ok",
        30,
        0.5,
        "a write through the healed mount",
    )
    assert op("read", m.path / "s" / f"after-{tag}")[:2] == ("ok", tag)
    wait_for(lambda: m.status()["etcd"]["watch"] == "up", 30, 0.2, "the watch up again")
    assert op("read", m.path / "s" / "shared")[0] == "ok"  # cached here now
    assert op("write", other.path / "s" / "shared", f"from-other-{tag}")[0] == "ok"
    wait_for(
        lambda: op("read", m.path / "s" / "shared")[:2] == ("ok", f"from-other-{tag}"),
        20,
        0.2,
        "the other node's write seen through the watch",
    )
    assert_alive(m)


@pytest.fixture
def proxy(etcd):
    p = EtcdProxy(etcd.endpoints.split(",")[0])
    yield p
    p.close()


@pytest.fixture
def pair(make_mount, proxy):
    """A mount behind the proxy and a second node on the same etcd and store."""
    m = make_mount(etcd_endpoints=proxy.endpoint)
    other = make_mount(name="other")
    os.mkdir(m.path / "s")
    assert op("write", m.path / "s" / "shared", "v1")[0] == "ok"
    # the other node learns of the new name through its watch, within a second
    wait_for(
        lambda: op("read", other.path / "s" / "shared")[:2] == ("ok", "v1"),
        5,
        0.1,
        "the write seen on the other node",
    )
    return m, other


def faulty_ops(m, tag: str) -> dict:
    return {
        "ls": op("ls", m.path / "s"),
        "stat": op("stat", m.path / "s" / "shared"),
        "write": op("write", m.path / "s" / f"during-{tag}", tag),
        "read": op("read", m.path / "s" / "shared"),
        "ls-root": op("ls", m.path),
    }


def test_blackhole_across_watch_recreation(pair, proxy):
    m, other = pair
    # Black-hole etcd, then reset the connections: the watch stream breaks and
    # the daemon makes it again over a new connection that never answers, so
    # the watch's creation times out (pyetcd's WatchTimedOut).
    proxy.set_mode("blackhole")
    proxy.reset_connections()
    t0 = time.monotonic()
    results = faulty_ops(m, "bh")
    # the point: stay black-holed past the watch's creation timeout (3 s) at least once more
    time.sleep(max(0.0, 8 - (time.monotonic() - t0)))
    results["write-late"] = op("write", m.path / "s" / "during-bh2", "x")
    assert_prompt(results)
    assert_alive(m)
    # a replace on the other node that this one's watch never sees: once the
    # watch is back, the name (which the kernel may keep 10 s while the watch
    # is up) is looked up afresh
    assert op("write", other.path / "s" / "shared", "while-away")[0] == "ok"
    proxy.set_mode("pass")
    wait_for(lambda: m.status()["etcd"]["watch"] == "up", 30, 0.2, "the watch up again")
    wait_for(
        lambda: op("read", m.path / "s" / "shared")[:2] == ("ok", "while-away"),
        3,
        0.2,
        "a replace made while the watch was down",
    )
    recovers(m, other, "bh")


def test_connection_resets(pair, proxy):
    m, other = pair
    resets = proxy.resets
    proxy.set_mode("reset")
    wait_for(lambda: proxy.resets > resets, 10, what="the daemon's connection reset")
    results = faulty_ops(m, "rst")
    assert_prompt(results)
    assert_alive(m)
    # flapping: connections that work for a second and are reset again
    outcomes = set()
    for i in range(6):
        proxy.set_mode("reset" if i % 2 else "pass")
        t0 = time.monotonic()
        j = 0
        while time.monotonic() - t0 < 1.0:
            r = op("write", m.path / "s" / f"flap{i}-{j}", str(i))
            assert_prompt({f"flap {i} write {j}": r})
            outcomes.add(r[0])
            j += 1
    assert "ok" in outcomes, outcomes
    assert_alive(m)
    proxy.set_mode("pass")
    recovers(m, other, "rst")


def test_slow_etcd(pair, proxy):
    m, other = pair
    # slower than usual but within the etcd timeout: everything still works
    proxy.set_mode("delay", 0.3)
    assert op("write", m.path / "s" / "slow", "slow")[0] == "ok"
    assert op("read", m.path / "s" / "slow")[:2] == ("ok", "slow")
    # slower than the etcd timeout, while the watch is being made again: an
    # errno, promptly, and the watch's creation times out
    proxy.set_mode("delay", 5.0)
    proxy.reset_connections()
    results = faulty_ops(m, "slow")
    assert_prompt(results)
    assert_alive(m)
    proxy.set_mode("pass")
    recovers(m, other, "slow")
