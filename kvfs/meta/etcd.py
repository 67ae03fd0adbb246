"""Metadata in etcd: the source of truth for the tree.

Keys under PREFIX (default "/kvfs/"):
    s/SESSION        session record (JSON): ctime, mode, owner, user xattrs
    t/SESSION        session mtime; every commit or delete in the session puts it,
                     so `rmdir` can compare-and-delete against concurrent creates
    e/SESSION/NAME   entry record (JSON): size, times, store object, checksum, xattrs
    lock/gc          held (with a lease) by the one expiry collector at work
Names never contain "/", so the keys parse unambiguously.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from ..errors import Conflict, Exists, KvfsError, MetaUnavailable, NotEmpty, NotFound
from ..records import Entry, SessionInfo, WatchEvent
from .base import Meta

log = logging.getLogger(__name__)

_TRANSIENT = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.InternalServerError,
    # a watch that etcd did not confirm in time: the same as a unary timeout
    etcd_exc.WatchTimedOut,
    grpc.RpcError,
    ValueError,  # pyetcd raises it for "Trying to use a failed node"
)

# gRPC channel settings. Keepalive finds a connection that went silent (a
# partition, a dead NAT entry) even when only the watch stream uses it; etcd
# refuses pings more often than every 5 s. A capped reconnect backoff makes an
# etcd that comes back usable within about 2 s, not gRPC's default of up to 120 s.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class WatchCompacted(KvfsError):
    """The watch's start revision is compacted away: start from now, read again."""


def parse_endpoints(spec) -> list[tuple[str, int]]:
    if isinstance(spec, str):
        spec = [s for s in spec.split(",") if s.strip()]
    out = []
    for item in spec:
        item = item.strip()
        if item.startswith("unix:"):
            # etcd names a unix socket like a TCP address, PATH:PORT (it insists
            # on that form), and gRPC dials "unix:/PATH:PORT" as it is: keep
            # "unix:/PATH" as the host so that pyetcd's HOST:PORT is that target
            item = "unix:/" + item[len("unix:") :].lstrip("/")
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme) :]
        host, _, port = item.rpartition(":")
        if not host or host == "unix:/" or not port.isdigit():
            raise KvfsError(f"bad etcd endpoint {item!r} (expected HOST:PORT or unix:///PATH:PORT)")
        out.append((host, int(port)))
    if not out:
        raise KvfsError("no etcd endpoint given")
    return out


class EtcdMeta(Meta):
    """Blocking etcd access; the daemon calls it from worker threads."""

    def __init__(
        self,
        endpoints,
        prefix: str = "/kvfs/",
        timeout: float = 3.0,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ):
        super().__init__()
        self.endpoints = parse_endpoints(endpoints)
        self.prefix = prefix.encode() if isinstance(prefix, str) else prefix
        self.timeout = timeout
        creds = None
        if ca_cert:
            creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(ca_cert, cert_key, cert_cert)
        eps = [
            # A failed member is retried after 1 s, not pyetcd's 300 s default,
            # so an etcd that comes back is used again promptly.
            pyetcd.Endpoint(
                h,
                p,
                secure=creds is not None,
                creds=creds,
                time_retry=1.0,
                opts=_CHANNEL_OPTIONS,
            )
            for h, p in self.endpoints
        ]
        self._lock = threading.Lock()
        try:
            self.client = pyetcd.MultiEndpointEtcd3Client(
                endpoints=eps, timeout=timeout, user=user, password=password, failover=True
            )
        except grpc.RpcError as exc:
            raise MetaUnavailable(f"etcd refused the connection: {_rpc_text(exc)}") from None
        if creds is None:
            # gRPC sends call credentials only over TLS; on a plain channel the
            # auth token travels as metadata alone (pyetcd sets both)
            self.client.call_credentials = None
        self._last_endpoint = self.client._current_endpoint_label

    @classmethod
    def from_config(cls, cfg, endpoints, prefix: str | None = None) -> "EtcdMeta":
        """Connect with the TLS and auth settings of a kvfs Config."""
        return cls(
            endpoints,
            prefix=prefix or cfg.etcd_prefix,
            timeout=cfg.etcd_timeout,
            ca_cert=cfg.etcd_ca_cert,
            cert_key=cfg.etcd_key,
            cert_cert=cfg.etcd_cert,
            user=cfg.etcd_user,
            password=cfg.etcd_password,
        )

    # -- plumbing --------------------------------------------------------------

    def _call(self, fn, *args, **kwargs):
        """Run one etcd call, failing over between members once each."""
        attempts = len(self.endpoints) + 1
        first = None
        for _ in range(attempts):
            self._stats["calls"] += 1
            try:
                result = fn(*args, **kwargs)
            except etcd_exc.PreconditionFailedError:
                # pyetcd's name for gRPC's FAILED_PRECONDITION: a refusal, not
                # an outage (it would otherwise escape as a foreign exception)
                self._stats["errors"] += 1
                raise KvfsError("etcd refused: failed precondition") from None
            except _TRANSIENT as exc:
                if isinstance(exc, grpc.RpcError) and exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    self._stats["errors"] += 1
                    raise KvfsError(f"etcd refused: {_rpc_text(exc)}") from None
                self._stats["errors"] += 1
                # the first error is the cause; later ones are mostly "no
                # member left to try" because the first marked it failed
                first = first or exc
                continue
            label = self.client._current_endpoint_label
            if label != self._last_endpoint:
                self._stats["failovers"] += 1
                log.warning("etcd: now using %s (was %s)", label, self._last_endpoint)
                self._last_endpoint = label
            return result
        if isinstance(first, grpc.RpcError):
            name, text = "RpcError", _rpc_text(first)
        else:
            name, text = type(first).__name__, str(first) or f"no answer in {self.timeout:g} s"
        raise MetaUnavailable(f"etcd unavailable: {name}: {text}")

    def _k(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    def _ek(self, session: str, name: str) -> bytes:
        return self.prefix + b"e/" + session.encode() + b"/" + name.encode()

    def _range_end(self, prefix: bytes) -> bytes:
        return pyetcd.utils.prefix_range_end(prefix)

    def _txn(self, compare, success, failure=()):
        return self.client.transaction(compare=compare, success=success, failure=list(failure))

    def _tops(self):
        return self.client.transactions

    # -- sessions --------------------------------------------------------------

    def get_session(self, name: str) -> SessionInfo | None:
        t = self._tops()
        ok, resp = self._call(
            self._txn,
            compare=[],
            success=[t.get(self._k("s", name)), t.get(self._k("t", name))],
        )
        if not resp[0]:
            return None
        raw, md = resp[0][0]
        info = SessionInfo.from_json(name, raw, md.mod_revision)
        if resp[1]:
            info.mtime_ns = int(resp[1][0][0])
        return info

    def list_sessions(self) -> list[SessionInfo]:
        sp = self._k("s", "")
        tp = self._k("t", "")
        out = {}
        for raw, md in self._call(lambda: list(self.client.get_prefix(sp))):
            name = md.key[len(sp) :].decode()
            out[name] = SessionInfo.from_json(name, raw, md.mod_revision)
        for raw, md in self._call(lambda: list(self.client.get_prefix(tp))):
            name = md.key[len(tp) :].decode()
            if name in out:
                out[name].mtime_ns = int(raw)
        return sorted(out.values(), key=lambda s: s.name)

    def create_session(self, info: SessionInfo) -> SessionInfo:
        t = self._tops()
        key = self._k("s", info.name)
        ok, resp = self._call(
            self._txn,
            compare=[t.version(key) == 0],
            success=[
                t.put(key, info.to_json()),
                t.put(self._k("t", info.name), str(info.mtime_ns)),
            ],
        )
        if not ok:
            raise Exists(f"session {info.name} exists")
        info.rev = resp[0].response_put.header.revision
        return info

    def update_session(self, info: SessionInfo) -> SessionInfo:
        """Write INFO back if nobody changed it since it was read."""
        t = self._tops()
        key = self._k("s", info.name)
        ok, resp = self._call(
            self._txn,
            compare=[t.mod(key) == info.rev],
            success=[
                t.put(key, info.to_json()),
                t.put(self._k("t", info.name), str(info.mtime_ns)),
            ],
        )
        if not ok:
            raise Conflict(f"session {info.name} changed")
        info.rev = resp[0].response_put.header.revision
        return info

    def delete_session(self, name: str) -> None:
        """Delete an empty session; atomic against a concurrent commit into it."""
        t = self._tops()
        skey, tkey = self._k("s", name), self._k("t", name)
        eprefix = self._k("e", name, "")
        for _ in range(10):
            ok, resp = self._call(
                self._txn,
                compare=[],
                success=[t.get(skey), t.get(tkey), t.get(eprefix, self._range_end(eprefix))],
            )
            if not resp[0]:
                raise NotFound(f"no session {name}")
            if resp[2]:
                raise NotEmpty(f"session {name} is not empty")
            cmp = [t.mod(skey) == resp[0][0][1].mod_revision]
            if resp[1]:
                cmp.append(t.mod(tkey) == resp[1][0][1].mod_revision)
            ok, _ = self._call(
                self._txn,
                compare=cmp,
                success=[t.delete(skey), t.delete(tkey)],
            )
            if ok:
                return
        raise Conflict(f"session {name} kept changing")

    # -- entries ---------------------------------------------------------------

    def get_entry(self, session: str, name: str) -> Entry | None:
        raw, md = self._call(self.client.get, self._ek(session, name))
        if raw is None:
            return None
        return Entry.from_json(session, name, raw, md.mod_revision)

    def list_entries(self, session: str) -> list[Entry]:
        p = self._k("e", session, "")
        out = []
        for raw, md in self._call(lambda: list(self.client.get_prefix(p))):
            out.append(Entry.from_json(session, md.key[len(p) :].decode(), raw, md.mod_revision))
        return out

    def iter_all_entries(self) -> Iterator[Entry]:
        p = self._k("e", "")
        items = self._call(lambda: list(self.client.get_prefix(p)))
        for raw, md in items:
            session, _, name = md.key[len(p) :].decode().partition("/")
            yield Entry.from_json(session, name, raw, md.mod_revision)

    def commit(self, entry: Entry, expect_rev: int | None = None) -> Entry | None:
        """Publish ENTRY in one transaction; returns the entry it replaced.

        Fails with NotFound if the session is gone, and with Conflict if
        EXPECT_REV is given and the current entry's revision differs (0 = absent).
        """
        t = self._tops()
        key = self._ek(entry.session, entry.name)
        skey = self._k("s", entry.session)
        cmp = [t.version(skey) > 0]
        if expect_rev is not None:
            cmp.append(t.mod(key) == expect_rev)
        ok, resp = self._call(
            self._txn,
            compare=cmp,
            success=[
                t.put(key, entry.to_json(), prev_kv=True),
                t.put(self._k("t", entry.session), str(entry.mtime_ns)),
            ],
            failure=[t.get(skey)],
        )
        if not ok:
            if not resp or not resp[0]:
                raise NotFound(f"no session {entry.session}")
            raise Conflict(f"{entry.session}/{entry.name} changed")
        put = resp[0].response_put
        entry.rev = put.header.revision
        if put.HasField("prev_kv") and put.prev_kv.value:
            return Entry.from_json(entry.session, entry.name, put.prev_kv.value)
        return None

    def commit_many(self, entries: list[Entry]) -> list[Entry | None]:
        """Several commits in one transaction: one round trip, one raft entry."""
        t = self._tops()
        sessions = list(dict.fromkeys(e.session for e in entries))
        ops = [t.put(self._ek(e.session, e.name), e.to_json(), prev_kv=True) for e in entries]
        mtime = {}
        for e in entries:
            mtime[e.session] = max(mtime.get(e.session, 0), e.mtime_ns)
        ops += [t.put(self._k("t", s), str(mtime[s])) for s in sessions]
        ok, resp = self._call(
            self._txn,
            compare=[t.version(self._k("s", s)) > 0 for s in sessions],
            success=ops,
        )
        if not ok:
            raise NotFound("a session of the group is gone")
        out = []
        for e, r in zip(entries, resp, strict=False):
            put = r.response_put
            e.rev = put.header.revision
            prev = None
            if put.HasField("prev_kv") and put.prev_kv.value:
                prev = Entry.from_json(e.session, e.name, put.prev_kv.value)
            out.append(prev)
        return out

    def delete_entry(self, session: str, name: str, expect_rev: int | None = None) -> Entry | None:
        t = self._tops()
        key = self._ek(session, name)
        cmp = [] if expect_rev is None else [t.mod(key) == expect_rev]
        ok, resp = self._call(
            self._txn,
            compare=cmp,
            success=[
                t.delete(key, prev_kv=True),
                t.put(self._k("t", session), str(time.time_ns())),
            ],
        )
        if not ok:
            raise Conflict(f"{session}/{name} changed")
        d = resp[0].response_delete_range
        if not d.prev_kvs:
            return None
        return Entry.from_json(session, name, d.prev_kvs[0].value)

    def rename_entry(self, entry: Entry, new_session: str, new_name: str) -> Entry | None:
        """Move ENTRY to a new name atomically; returns the entry it replaced."""
        t = self._tops()
        old = self._ek(entry.session, entry.name)
        new = self._ek(new_session, new_name)
        moved = Entry(**{**entry.__dict__, "session": new_session, "name": new_name})
        now = str(time.time_ns())
        ok, resp = self._call(
            self._txn,
            compare=[t.mod(old) == entry.rev, t.version(self._k("s", new_session)) > 0],
            # etcd refuses a transaction that writes one key twice
            success=[t.put(new, moved.to_json(), prev_kv=True), t.delete(old)]
            + [t.put(self._k("t", s), now) for s in dict.fromkeys([entry.session, new_session])],
        )
        if not ok:
            raise Conflict(f"{entry.session}/{entry.name} changed")
        put = resp[0].response_put
        moved.rev = put.header.revision
        if put.HasField("prev_kv") and put.prev_kv.value:
            return Entry.from_json(new_session, new_name, put.prev_kv.value)
        return None

    def change_entries(self, puts, deletes):
        t = self._tops()
        cmp, ops = [], []
        for session, name, expect in deletes:
            key = self._ek(session, name)
            cmp.append(t.mod(key) == expect if expect else t.version(key) == 0)
            ops.append(t.delete(key))
        sessions = list(dict.fromkeys([e.session for e, _ in puts]))
        for entry, expect in puts:
            key = self._ek(entry.session, entry.name)
            cmp.append(t.mod(key) == expect if expect else t.version(key) == 0)
            ops.append(t.put(key, entry.to_json()))
        cmp += [t.version(self._k("s", s)) > 0 for s in sessions]
        now = str(time.time_ns())
        touched = sessions + [s for s, _, _ in deletes]
        ops += [t.put(self._k("t", s), now) for s in dict.fromkeys(touched)]
        ok, resp = self._call(
            self._txn,
            compare=cmp,
            success=ops,
            failure=[t.get(self._k("s", s)) for s in sessions],
        )
        if not ok:
            for s, r in zip(sessions, resp, strict=True):
                if not r:
                    raise NotFound(f"no session {s}")
            raise Conflict("a name of the file changed")
        # one transaction, one revision: the session mtime put is always there
        rev = resp[-1].response_put.header.revision
        for entry, _ in puts:
            entry.rev = rev

    # -- cluster ---------------------------------------------------------------

    def revision(self) -> int:
        resp = self._call(self.client.get_response, self._k("rev-probe"))
        return resp.header.revision

    def health(self) -> list[dict]:
        """Ask every member for its status over the client's own channels (TLS, auth)."""
        out = []
        in_use = self.client._current_endpoint_label
        for label, ep in self.client.endpoints.items():
            try:
                st = etcdrpc.MaintenanceStub(ep.channel).Status(
                    etcdrpc.StatusRequest(),
                    1.0,
                    credentials=self.client.call_credentials,
                    metadata=self.client.metadata,
                )
                out.append(
                    {
                        "endpoint": label,
                        "healthy": True,
                        "version": st.version,
                        "leader": st.leader == st.header.member_id,
                        "in_use": label == in_use,
                    }
                )
            except Exception as exc:  # health is a report, never an error
                code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
                out.append({"endpoint": label, "healthy": False, "error": code})
        return out

    def try_lock(self, name: str, ttl: int, holder: str):
        """Take lock NAME for TTL seconds; returns a lease id, or None if held."""
        t = self._tops()
        lease = self._call(self.client.lease, ttl)
        key = self._k("lock", name)
        ok, _ = self._call(
            self._txn,
            compare=[t.version(key) == 0],
            success=[t.put(key, holder, lease=lease.id)],
        )
        if not ok:
            self._call(self.client.revoke_lease, lease.id)
            return None
        return lease.id

    def unlock(self, lease_id) -> None:
        self._call(self.client.revoke_lease, lease_id)

    def watch(self, callback: Callable, start_revision: int | None = None):
        """Call CALLBACK(list[WatchEvent] | Exception) from etcd's watch thread.

        Returns a handle for cancel_watch. A stream that ends for any reason
        delivers one exception; after that, nothing more arrives.
        """
        ep, sp, tp = self._k("e", ""), self._k("s", ""), self._k("t", "")

        def decode(resp) -> list[WatchEvent]:
            events = []
            for ev in resp.events:
                key = ev.key
                value = None if isinstance(ev, pyetcd.events.DeleteEvent) else ev.value
                rev = ev.mod_revision
                if key.startswith(ep):
                    session, _, name = key[len(ep) :].decode().partition("/")
                    events.append(WatchEvent("entry", session, name, value, rev))
                elif key.startswith(sp):
                    events.append(WatchEvent("session", key[len(sp) :].decode(), None, value, rev))
                elif key.startswith(tp) and value is not None:
                    events.append(WatchEvent("mtime", key[len(tp) :].decode(), None, value, rev))
            return events

        def on_response(resp):
            if resp is None:
                # pyetcd ends a stream that closed cleanly with None
                resp = MetaUnavailable("etcd closed the watch stream")
            elif isinstance(resp, grpc.RpcError):
                resp = MetaUnavailable(f"watch stream: {_rpc_text(resp)}")
            if not isinstance(resp, Exception):
                try:
                    resp = decode(resp)
                except Exception as exc:
                    # a key we cannot parse: better to re-read everything than
                    # to drop the event silently inside pyetcd's thread
                    resp = exc
            callback(resp)

        def create():
            # A watcher of its own per watch (not the client's shared one,
            # which pyetcd swaps out at a failover and never stops): its stream
            # is ours to cancel, so a watch that failed or was given up leaves
            # no stream and no thread behind.
            label = self.client._current_endpoint_label
            stream = _CancellableWatchStub(etcdrpc.WatchStub(self.client.channel))
            watcher = pyetcd.watch.Watcher(
                stream,
                timeout=self.timeout,
                call_credentials=self.client.call_credentials,
                metadata=self.client.metadata,
            )
            kwargs = {"range_end": self._range_end(self.prefix)}
            if start_revision:
                kwargs["start_revision"] = start_revision
            try:
                wid = watcher.add_callback(self.prefix, on_response, **kwargs)
            except BaseException as exc:
                stream.cancel()
                if isinstance(exc, etcd_exc.WatchTimedOut) or (
                    isinstance(exc, grpc.RpcError)
                    and exc.code()
                    in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                ):
                    # as pyetcd does for a failed unary call: the next attempt
                    # goes to another member, if there is one
                    ep_ = self.client.endpoints.get(label)
                    if ep_ is not None:
                        ep_.fail()
                raise
            return _WatchHandle(watcher, stream, wid)

        try:
            return self._call(create)
        except MetaUnavailable as exc:
            raise MetaUnavailable(f"cannot make the etcd watch: {exc}") from None
        except etcd_exc.RevisionCompactedError as exc:
            raise WatchCompacted(f"revision {start_revision} is compacted: {exc}") from None

    def cancel_watch(self, handle) -> None:
        """Stop a watch from watch(); never blocks, never raises."""
        try:
            handle.stream.cancel()
            handle.watcher.close()
        except Exception:  # the stream may already be gone
            pass

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


class _CancellableWatchStub:
    """A WatchStub that keeps its call, so that the stream can be cancelled.

    pyetcd's Watcher only half-closes its stream, and etcd keeps a half-closed
    watch stream open: without a cancel the stream and its thread live on."""

    def __init__(self, stub):
        self._stub = stub
        self._lock = threading.Lock()
        self._call = None
        self._cancelled = False

    def Watch(self, *args, **kwargs):  # noqa: N802 (gRPC's name)
        call = self._stub.Watch(*args, **kwargs)
        with self._lock:
            self._call = call
            if self._cancelled:
                call.cancel()
        return call

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()


class _WatchHandle:
    def __init__(self, watcher, stream: _CancellableWatchStub, watch_id):
        self.watcher = watcher
        self.stream = stream
        self.watch_id = watch_id

    def __repr__(self) -> str:
        return f"<watch {self.watch_id}>"


def _rpc_text(exc) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:
        return str(exc)
