"""`kvfs mount --metrics`: Prometheus scrapes of a real mount, over real HTTP."""

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kvfs.config import load_config
from kvfs.errors import KvfsError
from kvfs.metrics import parse_address, serving, session_usage

from kvfstest import KVFS, free_port, wait_for


def scrape(port: int, host: str = "127.0.0.1") -> dict:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def histogram_count(samples: dict, op: str) -> float:
    return value(samples, "kvfs_fuse_operation_seconds_count", operation=op)


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on PORT."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.append(addr)
    return found


def test_scrape_follows_file_operations(make_mount):
    port = free_port()
    m = make_mount("--metrics", f"127.0.0.1:{port}")
    before = scrape(port)
    assert value(before, "kvfs_up") == 1
    st = m.status()
    path = "passthrough" if st["passthrough"] == "on" else "daemon"

    data = os.urandom(3 << 20)
    (m.path / "chat-7").mkdir()
    (m.path / "chat-7" / "layer0").write_bytes(data)
    (m.path / "chat-7" / "layer1").write_bytes(data[:1000])
    assert (m.path / "chat-7" / "layer0").read_bytes() == data
    after = scrape(port)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("kvfs_commits_total") == 2
    assert moved("kvfs_files_written_total") == 2
    assert moved("kvfs_written_bytes_total") == len(data) + 1000
    assert moved("kvfs_opens_total", path=path) >= 1
    # every request is timed: the writes' creates and the read's open at least
    assert histogram_count(after, "create") - histogram_count(before, "create") >= 2
    assert histogram_count(after, "open") - histogram_count(before, "open") >= 1
    assert value(after, "kvfs_fuse_operation_seconds_bucket", operation="create", le="+Inf") >= 2
    assert value(after, "kvfs_store_used_bytes", store=st["store"]["url"]) == len(data) + 1000
    assert value(after, "kvfs_store_files", store=st["store"]["url"]) == 2

    # per-session use is counted off the loop, every 5 s
    def session_counted():
        s = scrape(port)
        return value(s, "kvfs_session_bytes", session="chat-7") == len(data) + 1000 and s

    counted = wait_for(session_counted, 12, 0.2, what="chat-7 counted")
    assert value(counted, "kvfs_session_files", session="chat-7") == 2
    assert value(counted, "kvfs_sessions") == 1

    # errors are counted per operation and errno
    with pytest.raises(OSError, match="not empty"):
        os.rmdir(m.path / "chat-7")
    errs = scrape(port)
    assert value(errs, "kvfs_fuse_errors_total", operation="rmdir", errno="ENOTEMPTY") == 1

    # the same numbers as `kvfs status --json`, which also lists the largest sessions
    st = m.status()
    assert value(errs, "kvfs_commits_total") == st["counters"]["commits"]
    assert value(errs, "kvfs_written_bytes_total") == st["counters"]["bytes_written"]
    for ep in st["etcd"]["endpoints"]:
        assert value(errs, "kvfs_etcd_endpoint_healthy", endpoint=ep["endpoint"]) in (0, 1)
    assert value(errs, "kvfs_etcd_watch_up") == 1
    assert st["sessions"]["count"] == 1  # counted: the scrape above saw it
    [top] = st["sessions"]["largest"]
    assert (top["session"], top["files"], top["bytes"]) == ("chat-7", 2, len(data) + 1000)

    text = subprocess.run(
        KVFS + ["status", str(m.path)], capture_output=True, text=True, check=True
    ).stdout
    assert "chat-7" in text and "2 files" in text

    # the server goes with the mount
    m.umount()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    assert listening(port) == []


def test_config_key_and_bare_port_serve_on_loopback_only(make_mount, tmp_path):
    port = free_port()
    conf = tmp_path / "kvfs.json"
    conf.write_text(json.dumps({"metrics": port}))  # a JSON number: a bare port
    make_mount("--config", str(conf))
    assert value(scrape(port), "kvfs_up") == 1
    # 127.0.0.1 only, never the wildcard address
    assert listening(port) == ["0100007F"]


def test_bad_metrics_address_fails_the_mount(make_mount):
    with pytest.raises(AssertionError, match="bad value 'nonsense' for 'metrics'"):
        make_mount("--metrics", "nonsense")
    # an address of no interface here (TEST-NET-1)
    with pytest.raises(AssertionError, match=r"metrics: cannot serve on 192\.0\.2\.1:"):
        make_mount("--metrics", "192.0.2.1:9")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(AssertionError, match="Address already in use"):
            make_mount("--metrics", f"127.0.0.1:{taken}")


def test_scrapes_never_stall_the_mount(make_mount):
    """Scrapes run beside the loop: many at once while files are written, and
    one that never finishes sending its request holds up nothing."""
    port = free_port()
    m = make_mount("--metrics", str(port))
    (m.path / "s").mkdir()
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
    stop = threading.Event()
    failures = []

    def scraper():
        while not stop.is_set():
            try:
                assert value(scrape(port), "kvfs_up") == 1
            except Exception as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=scraper) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            (m.path / "s" / f"f{i}").write_bytes(b"x" * 4096)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures
    assert wait_for(lambda: value(scrape(port), "kvfs_commits_total") == 30, what="30 commits")
    stuck.close()


def test_a_stuck_loop_scrapes_as_down(kvfs_mount):
    """The exporter over a trio loop that stops answering (as a hung daemon's
    would): the scrape still succeeds, with kvfs_up 0, and recovers with it."""
    st = kvfs_mount.status()  # a real status document to serve
    port = free_port()
    seen = []

    async def main():
        async with serving(f"127.0.0.1:{port}", lambda: st, timeout=0.5):
            seen.append(await trio.to_thread.run_sync(scrape, port))
            during = []
            t = threading.Thread(target=lambda: during.append(scrape(port)))
            t.start()
            time.sleep(2)  # blocks the loop, longer than the scrape waits
            await trio.to_thread.run_sync(t.join, 10)
            seen.extend(during)
            seen.append(await trio.to_thread.run_sync(scrape, port))

    trio.run(main)
    assert [value(s, "kvfs_up") for s in seen] == [1, 0, 1]
    assert value(seen[0], "kvfs_commits_total") == st["counters"]["commits"]
    assert ("kvfs_commits_total", ()) not in seen[1]  # nothing made up while down


def test_parse_address():
    assert parse_address("9100") == ("127.0.0.1", 9100)
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    for bad in ("", ":9100", "host:", "host:0", "host:70000", "host:x"):
        with pytest.raises(KvfsError):
            parse_address(bad)
    assert load_config(None, env={"KVFS_METRICS": "10.0.0.5:9100"}).metrics == "10.0.0.5:9100"
    with pytest.raises(KvfsError, match="KVFS_METRICS: bad value"):
        load_config(None, env={"KVFS_METRICS": "x:y"})
    assert load_config(None, env={}).metrics is None


def test_session_usage_ranks_by_bytes():
    index = {
        ("a", "l0"): (10, 5_000_000_000),
        ("a", "l1"): (10, 7_000_000_000),
        ("b", "l0"): (100, 1_000_000_000),
        ("c", "l0"): (1, 2_000_000_000),
    }
    u = session_usage(index, top=2)
    assert u["count"] == 3
    assert u["largest"] == [
        {"session": "b", "files": 1, "bytes": 100, "last_use": 1.0},
        {"session": "a", "files": 2, "bytes": 20, "last_use": 7.0},
    ]


def test_gc_says_what_it_removed(make_mount):
    port = free_port()
    m = make_mount(
        "--ttl", "3", "--cleanup-interval", "3600", "--no-touch-on-read", "--metrics", str(port)
    )
    for session, n in (("old-big", 3), ("old-small", 1), ("keep", 1)):
        (m.path / session).mkdir()
        for i in range(n):
            (m.path / session / f"l{i}").write_bytes(b"x" * (1000 if session == "old-big" else 10))
    # the ttl passes for these; "fresh" has 3 s to spare however slow this host is
    time.sleep(3.2)
    (m.path / "keep" / "fresh").write_bytes(b"y")
    out = subprocess.run(KVFS + ["gc", str(m.path)], capture_output=True, text=True, check=True)
    # 5 files from 3 sessions ("keep" keeps its fresh file, so stays)
    assert (
        "expired 5 entries: 5 files (2.9 KiB) from 3 sessions, and 0 empty sessions" in out.stdout
    ), out.stdout
    lines = out.stdout.splitlines()
    assert lines[1:] == [
        "  old-big: 3 files, 2.9 KiB",
        "  keep: 1 files, 10 B",  # a tie: by name
        "  old-small: 1 files, 10 B",
    ]
    gc = m.status()["gc"]
    assert (gc["running"], gc["done"], gc["total"]) == (False, 5, 5)
    samples = scrape(port)
    assert value(samples, "kvfs_gc_last_removed_files") == 5
    assert value(samples, "kvfs_gc_last_removed_bytes") == 3020
    assert value(samples, "kvfs_gc_running") == 0
    assert value(samples, "kvfs_expiries_total") == 5


def test_dashboard_queries_only_metrics_that_exist(make_mount, tmp_path):
    """docs/grafana-kvfs.json asks for nothing a daemon or the connector does not export."""
    from kvfs_connector.counters import FIELDS

    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs" / "grafana-kvfs.json").read_text()
    )
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"(?:vllm:)?kvfs_\w+|process_\w+", target["expr"]))
    port = free_port()
    # every optional part on, so every family the dashboard may ask for is there
    m = make_mount("--metrics", str(port), "--capacity", "1G", "--ssd-cache", str(tmp_path / "ssd"))
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"x")

    def counted():  # per-session use is counted every 5 s
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return "kvfs_session_bytes{" in text and text

    text = wait_for(counted, 12, 0.2, what="session s counted")
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    exported |= set(
        re.findall(r"^# TYPE (\S+) counter", text, re.M)
    )  # a family with no samples yet
    exported |= {name + "_total" for name in re.findall(r"^# TYPE (\S+) counter", text, re.M)}
    exported |= {f"vllm:kvfs_{name}_total" for name in FIELDS}
    assert len(queried) > 30
    assert queried <= exported, sorted(queried - exported)


def test_ssd_cache_tier_is_exported(make_mount, tmp_path):
    port = free_port()
    cache = tmp_path / "ssd"
    m = make_mount("--metrics", str(port), "--ssd-cache", str(cache), "--prefetch")
    (m.path / "s").mkdir()
    (m.path / "s" / "l0").write_bytes(b"k" * 5000)
    before = scrape(port)
    for _ in range(3):
        assert (m.path / "s" / "l0").read_bytes() == b"k" * 5000
    after = scrape(port)
    st = m.status()["ssd_cache"]

    def v(samples, name):
        return value(samples, name, cache_dir=str(cache))

    reads = v(after, "kvfs_ssd_cache_hits_total") + v(after, "kvfs_ssd_cache_misses_total")
    assert (
        reads - v(before, "kvfs_ssd_cache_hits_total") - v(before, "kvfs_ssd_cache_misses_total")
        >= 1
    )
    assert v(after, "kvfs_ssd_cache_hits_total") == st["hits"]
    assert v(after, "kvfs_ssd_cache_used_bytes") == st["used"] > 0
    assert v(after, "kvfs_ssd_cache_capacity_bytes") == st["capacity"]
    assert value(after, "kvfs_prefetch_layers_ahead") == st["prefetch"]["layers_ahead"]
