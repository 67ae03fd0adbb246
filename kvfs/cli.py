"""The `kvfs` command line: mount, umount, gc, status, recover."""

import argparse
import errno
import json
import logging
import os
import subprocess
import sys
import time

from .config import load_config
from .errors import KvfsError

log = logging.getLogger("kvfs")


def setup_logging(debug: bool) -> None:
    # journald adds its own timestamps; a terminal wants them
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format=fmt, stream=sys.stderr
    )
    for noisy in ("grpc", "pyetcd"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def _mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint")
    p.add_argument("--config", "-c", help="JSON config file (the original's keys accepted)")
    p.add_argument("--store", help="backing store, e.g. local:/var/lib/kvfs/store")
    p.add_argument("--etcd", help="etcd endpoints HOST:PORT[,HOST:PORT...]; none = private etcd")
    p.add_argument("--ttl", help="seconds an entry lives after its last mtime (default 86400)")
    p.add_argument("--cleanup-interval", help="seconds between expiry passes (default 3600)")
    p.add_argument("--capacity", help="bytes the store may hold (K/M/G suffixes); LRU eviction")
    p.add_argument(
        "--max-file-size", help="largest file (K/M/G/T suffixes; default 64G); beyond it EFBIG"
    )
    p.add_argument("--state-dir", help="where the default store and logs live")
    p.add_argument("--etcd-prefix", help="key prefix in etcd (default /kvfs/)")
    p.add_argument("--etcd-ca-cert", help="CA certificate for etcd over TLS")
    p.add_argument("--etcd-cert", help="client certificate for etcd")
    p.add_argument("--etcd-key", help="client key for etcd")
    p.add_argument("--etcd-user", help="etcd user (password from KVFS_ETCD_PASSWORD)")
    p.add_argument(
        "--no-touch-on-read", action="store_true", help="reads do not extend an entry's life"
    )
    p.add_argument("--touch-interval", help="a read extends life at most this often (s)")
    p.add_argument(
        "--no-passthrough",
        action="store_true",
        help="serve every byte through the daemon (no FUSE passthrough)",
    )
    p.add_argument(
        "--verify-reads",
        action="store_true",
        help="check every read against its block checksums (reads through the daemon)",
    )
    p.add_argument(
        "--scrub-interval", help="seconds between background scrubs (default 86400; 0 = never)"
    )
    p.add_argument("--scrub-rate", help="bytes/s a background scrub reads (default 64M)")
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics there (a bare PORT: on 127.0.0.1; default off)",
    )
    p.add_argument(
        "--ssd-cache",
        metavar="DIR",
        help="a local cache directory in front of a remote store (enable_ssd_caching)",
    )
    p.add_argument("--ssd-cache-size", help="bytes the SSD cache holds (K/M/G; default 16G)")
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="reading a layer fetches the session's next ones into the SSD cache",
    )
    p.add_argument("--prefetch-layers", help="how many layers ahead --prefetch fetches (4)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--allow-other", action="store_true", help="let other users use the mount")
    p.add_argument("--debug", action="store_true", help="log every decision")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


COMMANDS = {"mount", "umount", "gc", "scrub", "status", "recover", "-h", "--help"}


def _config_from(args):
    over = {
        "store": args.store,
        "etcd": args.etcd,
        "ttl": args.ttl,
        "cleanup_interval": args.cleanup_interval,
        "capacity": args.capacity,
        "max_file_size": args.max_file_size,
        "state_dir": args.state_dir,
        "etcd_prefix": args.etcd_prefix,
        "etcd_ca_cert": args.etcd_ca_cert,
        "etcd_cert": args.etcd_cert,
        "etcd_key": args.etcd_key,
        "etcd_user": args.etcd_user,
        "allow_other": True if args.allow_other else None,
        "touch_on_read": False if args.no_touch_on_read else None,
        "touch_interval": args.touch_interval,
        "passthrough": False if args.no_passthrough else None,
        "verify_reads": True if args.verify_reads else None,
        "scrub_interval": args.scrub_interval,
        "scrub_rate": args.scrub_rate,
        "metrics": args.metrics,
        "enable_ssd_caching": True if args.ssd_cache else None,
        "ssd_cache_dir": args.ssd_cache,
        "ssd_cache_size": args.ssd_cache_size,
        "enable_prefetch": True if args.prefetch else None,
        "prefetch_layers": args.prefetch_layers,
        "debug": True if args.debug else None,
    }
    return load_config(args.config, overrides=over)


def cmd_mount(args) -> int:
    cfg = _config_from(args)
    mnt = os.path.abspath(args.mountpoint)
    try:
        os.stat(mnt)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise KvfsError(
                f"{mnt}: a dead kvfs mount is left there; run kvfs umount {mnt}"
            ) from None
    if not os.path.isdir(mnt):
        raise KvfsError(f"mountpoint {mnt} is not a directory")
    if os.path.ismount(mnt):
        raise KvfsError(f"{mnt} is already a mount point")
    if not args.foreground:
        return _spawn_background(args, cfg)
    setup_logging(cfg.debug)
    from .daemon import mount

    def ready():
        # tell the parent that spawned us (_spawn_background) to return
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    mount(cfg, mnt, on_ready=ready)
    log.info("unmounted %s", mnt)
    jpype = sys.modules.get("jpype")
    if jpype is not None and jpype.isJVMStarted():
        # A Crail store ran a JVM in this process. Its shutdown at exit waits
        # for the Crail client's threads, which a Crail in trouble may never
        # end (seen: an unmounted daemon alive 20 s on). Every commit is
        # durable and published by now: end here.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _spawn_background(args, cfg) -> int:
    r, w = os.pipe()
    argv = [sys.executable, "-m", "kvfs.cli"] + list(args.argv)
    argv += ["--foreground", "--ready-fd", str(w)]
    os.makedirs(cfg.state_dir, exist_ok=True)
    logpath = os.path.join(cfg.state_dir, "kvfs.log")
    with open(logpath, "ab") as logf:
        proc = subprocess.Popen(
            argv,
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
    os.close(w)
    with os.fdopen(r, "rb") as rf:
        line = rf.readline()
    if line.strip() == b"ready":
        print(f"kvfs: mounted {os.path.abspath(args.mountpoint)} (pid {proc.pid}, log {logpath})")
        return 0
    proc.wait()
    with open(logpath, "rb") as f:
        tail = f.read()[-3000:].decode(errors="replace")
    sys.stderr.write(tail)
    raise KvfsError(f"the daemon exited with status {proc.returncode} before the mount was ready")


def read_status(mountpoint: str) -> dict:
    try:
        raw = os.getxattr(mountpoint, "user.kvfs.status")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise KvfsError(f"{mountpoint} is not a kvfs mount") from None
        raise KvfsError(f"{mountpoint}: {os.strerror(exc.errno)}") from None
    return json.loads(raw)


def cmd_status(args) -> int:
    st = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    s = st["store"]
    print(f"kvfs {st['version']} at {st['mountpoint']} (pid {st['pid']}, node {st['node']})")
    cap = s["capacity"] if s["capacity"] is not None else s["medium_total"]
    print(f"store     {s['url']}: {s['entries']} files, {_h(s['used'])} used of {_h(cap)}")
    if s.get("last_error"):  # absent from an older daemon's status
        print(f"          last store error: {s['last_error']}")
    c = st["counters"]
    print(f"read      {c['files_read']} files, {_h(c['bytes_read'])}")
    print(f"written   {c['files_written']} files, {_h(c['bytes_written'])}, {c['commits']} commits")
    print(
        f"removed   {c['deletes']} deletes, {c['expiries']} expired, "
        f"{c['evictions']} evicted, {c['corrupt']} corrupt reads"
    )
    ss = st.get("sessions")  # absent from an older daemon's status
    if ss:
        shown = len(ss["largest"])
        print(f"sessions  {ss['count']} with files; the {shown} largest:")
        width = max(len(s["session"]) for s in ss["largest"]) if shown else 0
        for s in ss["largest"]:
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_use"]))
            print(
                f"          {s['session']:{width}}  {s['files']} files, {_h(s['bytes'])}, "
                f"last use {used}"
            )
    sc = st.get("ssd_cache")
    if sc:
        print(
            f"ssd cache {sc['dir']}: {sc['objects']} objects, {_h(sc['used'])} of "
            f"{_h(sc['capacity'])}; {sc['hits']} hits, {sc['misses']} misses, "
            f"{sc['prefetched']} prefetched, {sc['evictions']} evicted"
        )
    for level in ("session", "layer", "recent"):
        lv = st["cache"][level]
        print(f"cache     {level:8} {lv['hits']} hits, {lv['misses']} misses")
    e = st["etcd"]
    for ep in e["endpoints"]:
        state = "healthy" if ep.get("healthy") else f"DOWN ({ep.get('error')})"
        print(f"etcd      {ep['endpoint']} {state}{' (in use)' if ep.get('in_use') else ''}")
    print(f"etcd      watch {e['watch']}, {e['errors']} errors, {e['failovers']} failovers")
    return 0


def _h(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_gc(args) -> int:
    """Expire idle files now, with a progress bar; say what was removed."""
    import threading

    from .recovery import Progress

    before = read_status(args.mountpoint)["counters"]["expiries"]
    failed = []

    def run():
        try:
            os.setxattr(args.mountpoint, "user.kvfs.control.gc", b"1")
        except OSError as exc:
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    bar = Progress("kvfs gc", 0)
    while t.is_alive():
        t.join(0.2)
        gc = read_status(args.mountpoint).get("gc", {})
        if gc.get("running") and gc.get("total"):
            bar(gc["done"], gc["total"])
    if failed:
        raise KvfsError(f"gc: {os.strerror(failed[0].errno)}")
    st = read_status(args.mountpoint)
    gc = st.get("gc")
    if not gc or "removed_files" not in gc:  # a daemon from before `gc` existed
        print(f"kvfs: expired {st['counters']['expiries'] - before} entries")
        return 0
    if gc["total"]:
        bar(gc["done"], gc["total"])
    print(
        f"kvfs: expired {gc['removed_files'] + gc['removed_sessions']} entries: "
        f"{gc['removed_files']} files ({_h(gc['removed_bytes'])}) from "
        f"{gc['from_sessions']} sessions, and {gc['removed_sessions']} empty sessions"
    )
    for s in gc["largest"]:
        print(f"  {s['session']}: {s['files']} files, {_h(s['bytes'])}")
    if gc["from_sessions"] > len(gc["largest"]):
        print(f"  ... and {gc['from_sessions'] - len(gc['largest'])} more sessions")
    return 0


def cmd_scrub(args) -> int:
    """Check every stored version now, with a progress bar; quarantine the bad."""
    import threading

    from .recovery import Progress

    before = read_status(args.mountpoint)["counters"]["quarantined"]
    failed = []

    def run():
        try:
            os.setxattr(args.mountpoint, "user.kvfs.control.scrub", b"1")
        except OSError as exc:
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    bar = Progress("kvfs scrub", 0)
    while t.is_alive():
        t.join(0.2)
        st = read_status(args.mountpoint)["scrub"]
        if st.get("total"):
            bar(st["done"], st["total"])
    if failed:
        raise KvfsError(f"scrub: {os.strerror(failed[0].errno)}")
    st = read_status(args.mountpoint)
    bar(st["scrub"]["done"], st["scrub"]["total"])
    found = st["counters"]["quarantined"] - before
    print(f"kvfs: scrubbed {st['scrub']['done']} files, quarantined {found}")
    return 0


def cmd_umount(args) -> int:
    mnt = os.path.abspath(args.mountpoint)
    pid = None
    try:
        pid = read_status(mnt)["pid"]
    except KvfsError:
        pass
    from .daemon import unmount

    try:
        unmount(mnt)
    except KvfsError as exc:
        if "not connected" in str(exc) or "Transport endpoint" in str(exc):
            unmount(mnt, lazy=True)  # the daemon died: clear its dead mount
        else:
            raise
    if pid is not None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return 0


def cmd_recover(args) -> int:
    from .meta import EtcdMeta
    from .recovery import Progress, recover
    from .store import open_store

    setup_logging(False)
    cfg = load_config(args.config)
    store_spec, endpoints, prefix = args.store, args.etcd, args.etcd_prefix
    if args.mountpoint:
        st = read_status(args.mountpoint)
        store_spec = store_spec or st["store"]["url"]
        endpoints = endpoints or ",".join(e["endpoint"] for e in st["etcd"]["endpoints"])
        prefix = prefix or st["etcd"].get("prefix")
    store_spec = store_spec or cfg.store_spec()
    endpoints = endpoints or ",".join(cfg.etcd)
    if not endpoints:
        raise KvfsError("recover needs a mountpoint or --etcd")
    store = open_store(store_spec, node="recover")
    meta = EtcdMeta.from_config(cfg, endpoints, prefix)
    try:
        result = recover(store, meta, Progress("recover", 0), delete_stale=args.delete_stale)
    finally:
        meta.close()
    if args.mountpoint:
        try:
            os.setxattr(args.mountpoint, "user.kvfs.control.invalidate", b"1")
        except OSError:
            pass
    print(
        f"kvfs: recovered {result['entries_restored']} entries "
        f"({result['sessions_created']} sessions created, {result['entries_kept']} already "
        f"in etcd, {result['stale_objects']} stale or unreadable objects) "
        f"from {result['objects']} objects"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvfs", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", help="mount the KV cache filesystem")
    _mount_args(m)
    m.set_defaults(fn=cmd_mount)
    u = sub.add_parser("umount", help="unmount and stop the daemon")
    u.add_argument("mountpoint")
    u.set_defaults(fn=cmd_umount)
    g = sub.add_parser("gc", help="expire idle entries now")
    g.add_argument("mountpoint")
    g.set_defaults(fn=cmd_gc)
    c = sub.add_parser("scrub", help="check every stored file's bytes now; quarantine bad ones")
    c.add_argument("mountpoint")
    c.set_defaults(fn=cmd_scrub)
    s = sub.add_parser("status", help="store use, counters, cache hits, etcd health")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    r = sub.add_parser("recover", help="rebuild etcd's metadata from the store")
    r.add_argument("mountpoint", nargs="?", help="a live mount (its store and etcd are used)")
    r.add_argument("--config", "-c")
    r.add_argument("--store", help="store spec, e.g. local:/var/lib/kvfs/store")
    r.add_argument("--etcd", help="etcd endpoints HOST:PORT[,...]")
    r.add_argument("--etcd-prefix", help="key prefix in etcd (default /kvfs/)")
    r.add_argument(
        "--delete-stale", action="store_true", help="also delete superseded and unreadable objects"
    )
    r.set_defaults(fn=cmd_recover)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        # mount.fuse runs "kvfs SOURCE MOUNTPOINT -o ..." for `mount -t fuse.kvfs`
        return mount_helper(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except KvfsError as exc:
        print(f"kvfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def mount_helper(argv=None) -> int:
    """mount.kvfs SOURCE MOUNTPOINT [-o opts]: for mount(8) and /etc/fstab."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: mount.kvfs SOURCE MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return 1
    _source, mnt, rest = argv[0], argv[1], argv[2:]
    out = ["mount", mnt]
    if "-o" in rest:
        for opt in rest[rest.index("-o") + 1].split(","):
            key, _, val = opt.partition("=")
            if key in (
                "rw",
                "defaults",
                "auto",
                "noauto",
                "nofail",
                "_netdev",
                "user",
                "dev",
                "suid",
                "exec",
                "nodev",
                "nosuid",
                "noexec",
            ) or key.startswith("x-"):
                continue
            if key == "etcd":
                val = val.replace("+", ",")  # "," already separates -o options
            out += [f"--{key.replace('_', '-')}"] + ([val] if val else [])
    return main(out)


if __name__ == "__main__":
    sys.exit(main())
