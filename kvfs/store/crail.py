"""The `crail` store: objects as files in Apache Crail, through one in-process JVM.

    --store crail://HOST:PORT/PATH     a NameNode at HOST:PORT, objects under PATH
    --store crail:PATH                 the NameNode of $CRAIL_HOME/conf/crail-site.conf
    (config: "storage_type": "crail", "crail_dir": PATH)

One JVM per process, started at the first Crail store through JPype and kept
for the process's life (a JVM cannot be restarted in a process), and one
`CrailStore` client per store: never a JVM per call. Bytes move through direct
ByteBuffers that wrap Python's own memory (`jpype.nio.convertToDirectBuffer`),
so a read lands in the caller's buffer with no copy in between.

Writes are staged in a local file (so the kernel can write it directly: FUSE
passthrough); the commit uploads it to PATH/.staging/NODE/ and renames it to
PATH/KEY, so a reader never sees a partial object. The staged file's name is
the intent record, as in the `local` store: a crash between the upload and
etcd's commit is settled by `clean_staging` at the next start.

Crail files are written once, front to back: `rewrite_header` writes a new
object and swaps it in. A lost connection (NameNode or DataNode gone) fails
the call with StoreError (EIO) and the next call connects again, so the
store recovers when Crail does, without a remount.
"""

import atexit
import functools
import glob
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ..errors import KvfsError, NotFound, StoreError
from .base import LocallyStagedWriter, ObjectStat, Store, StoreReader, StoreWriter
from .local import LocalStore

log = logging.getLogger(__name__)

JVM_HEAP = os.environ.get("KVFS_CRAIL_JVM_HEAP", "256m")

_jvm_lock = threading.Lock()
_java = None  # the Java classes this module uses, once the JVM runs


def crail_home() -> str:
    """Where the Crail jars (jars/), kvfs's NameNode (classes/) and a default
    configuration (conf/) are: KVFS_CRAIL_HOME, else the virtualenv's crail/."""
    return os.environ.get("KVFS_CRAIL_HOME") or os.path.join(sys.prefix, "crail")


def java_options() -> list[str]:
    # Crail's buffers reach into sun.nio.ch.DirectBuffer, closed since Java 17
    return [
        "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
        "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
        "--add-opens=java.base/java.nio=ALL-UNNAMED",
    ]


def _classes():
    """Start the JVM once for this process; the Crail classes kvfs uses."""
    global _java
    with _jvm_lock:
        if _java is not None:
            return _java
        try:
            import jpype
            import jpype.imports  # noqa: F401 - makes `from org.apache... import` work
        except ImportError:
            raise KvfsError("the crail store needs jpype1 (tools/setup.sh installs it)") from None
        home = crail_home()
        jars = sorted(glob.glob(os.path.join(home, "jars", "*.jar")))
        if not jars:
            raise KvfsError(f"no Crail jars in {home}/jars (tools/setup.sh fetches them)")
        if not os.environ.get("CRAIL_HOME"):
            # Crail reads $CRAIL_HOME/conf/crail-site.conf; ours names the TCP
            # NameNode binding and storage tier, the spec names the NameNode
            os.environ["CRAIL_HOME"] = _default_conf()
        if not jpype.isJVMStarted():
            jpype.startJVM(
                f"-Xmx{JVM_HEAP}",
                *java_options(),
                classpath=[os.path.join(os.environ["CRAIL_HOME"], "conf"), *jars],
                convertStrings=True,
            )
        from java.util.concurrent import TimeUnit
        from org.apache.crail import (
            CrailLocationClass,
            CrailNodeType,
            CrailStorageClass,
        )
        from org.apache.crail import CrailStore as JStore
        from org.apache.crail.conf import CrailConfiguration, CrailConstants
        from org.apache.crail.memory import OffHeapBuffer

        _java = {
            "nio": jpype.nio,
            "JException": jpype.JException,
            "Store": JStore,
            "Conf": CrailConfiguration,
            "Type": CrailNodeType,
            "Storage": CrailStorageClass,
            "Location": CrailLocationClass,
            "wrap": OffHeapBuffer.wrap,
            "Constants": CrailConstants,
            "MILLISECONDS": TimeUnit.MILLISECONDS,
        }
        return _java


DEFAULT_CONF = """\
crail.namenode.rpctype org.apache.crail.namenode.rpc.tcp.TcpNameNode
crail.storage.types org.apache.crail.storage.tcp.TcpStorageTier
crail.blocksize 1048576
crail.buffersize 1048576
crail.cachelimit 0
crail.rpctimeout 3000
crail.datatimeout 3000
"""

LOG4J = """\
log4j.rootLogger=WARN, A1
log4j.appender.A1=org.apache.log4j.ConsoleAppender
log4j.appender.A1.layout=org.apache.log4j.PatternLayout
log4j.appender.A1.layout.ConversionPattern=crail %p %c{1}: %m%n
"""


def _default_conf() -> str:
    d = tempfile.mkdtemp(prefix="kvfs-crail-")
    atexit.register(shutil.rmtree, d, True)
    os.mkdir(os.path.join(d, "conf"))
    with open(os.path.join(d, "conf", "crail-site.conf"), "w") as f:
        f.write(DEFAULT_CONF + f"crail.cachepath {d}/cache\n")
    with open(os.path.join(d, "conf", "log4j.properties"), "w") as f:
        f.write(LOG4J)
    return d


def _text(exc) -> str:
    """A Java exception's message, its cause's when it only wraps one."""
    msg = str(exc)
    cause = getattr(exc, "getCause", None)
    if cause is not None:
        try:
            c = exc.getCause()
            while c is not None and c.getCause() is not None:
                c = c.getCause()
            if c is not None:
                msg = str(c.getMessage() or c)
        except Exception:
            pass
    return msg


def parse_spec(arg: str) -> tuple[str | None, str]:
    """("HOST:PORT" or None, PATH) from "//HOST:PORT/PATH" or "PATH"."""
    if arg.startswith("//"):
        rest = arg[2:]
        address, _, path = rest.partition("/")
        if not address or ":" not in address:
            raise KvfsError(f"crail store {arg!r}: expected crail://HOST:PORT/PATH")
        return address, posixpath.normpath("/" + path.lstrip("/"))
    # the original's crail_dir may be relative ("./crail_kvcache"): from the root
    return None, posixpath.normpath("/" + (arg or "kvfs").lstrip("/"))


WORKERS = 16  # Crail calls in flight at most; a call beyond waits (within its time limit)
# words of a Crail error that mean the connection is gone, not the request bad
LOST_CONNECTION = ("connection", "broken pipe", "no answer", "closed", "timeout", "timed out")
RECONNECT_EVERY = 2.0  # seconds: a new client costs a JVM some memory; not one per error
CLOSE_DROPPED_AFTER = 60.0  # seconds a dropped client stays open for late answers
PUBLISH_ATTEMPTS = 3  # renames onto a key that another put keeps taking
STAGING = ".staging"  # PATH/.staging/NODE/: uploads on their way to their key


def guarded(fn):
    """Run the Crail call FN on the store's workers, for at most its time limit.

    Crail's own waits have no limit in places (a frozen DataNode or NameNode
    hangs them), and a FUSE request must not hang: past the limit the caller
    gets StoreError (EIO) while the stuck worker finishes whenever Crail does.
    """

    @functools.wraps(fn)
    def wrapper(self, *args):
        return self._run(f"{fn.__name__} {args[0] if args else ''}".strip(), fn, self, *args)

    return wrapper


class CrailStore(Store):
    def __init__(self, arg: str, node: str = "default", state_dir: str | None = None, **_):
        self.address, self.base = parse_spec(arg)
        if self.base == "/":
            raise KvfsError("crail store: give a directory, e.g. crail://HOST:PORT/kvfs")
        self.url = f"crail://{self.address}{self.base}" if self.address else f"crail:{self.base}"
        self.node = node
        # a local staging directory: a staged file is one the kernel can write
        staging = os.path.join(state_dir or tempfile.gettempdir(), "crail-staging")
        self.local = LocalStore(staging, node=node, durable=False)
        self._j = _classes()
        # reentrant: a failed connect reports (_failed) while holding it
        self._lock = threading.RLock()
        self._fs = None
        self._dropped = 0.0
        self._dirs: set[str] = set()
        self._dropped_clients: list = []  # dropped, closed later (see _failed)
        self.errors = 0
        self.last_error: str | None = None
        self._workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="crail")
        self.timeout = 30.0  # until the client has read its own time limits
        # fail the mount now, not at the first read, if Crail is not there
        self._run("connect", self._client)
        c = self._j["Constants"]
        # reads go a block at a time (see _read_into)
        self.block = int(c.BLOCK_SIZE)
        # Crail's own limits (ms), and time for a call of a few requests
        self.ms = max(int(c.RPC_TIMEOUT), int(c.DATA_TIMEOUT))
        self.timeout = self.ms / 1000 + 2
        self._run(f"mkdir {self.base}", self._mkdir, self.base)

    def _run(self, what: str, fn, *args):
        fut = self._workers.submit(fn, *args)
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            raise self._failed(what, f"no answer from Crail in {self.timeout:g} s") from None

    def _wait(self, fut):
        """A Crail future's value, within Crail's own time limit."""
        return fut.get(self.ms, self._j["MILLISECONDS"])

    # -- the client ---------------------------------------------------------------

    def _client(self):
        with self._lock:
            if self._fs is None:
                conf = self._j["Conf"]()
                # a client of our own: Crail otherwise hands every caller one
                # shared instance, and a new one after a failure is the point
                conf.set("crail.singleton", "false")
                if self.address:
                    conf.set("crail.namenode.address", f"crail://{self.address}")
                try:
                    self._fs = self._j["Store"].newInstance(conf)
                except self._j["JException"] as exc:
                    raise self._failed("connect", exc) from None
                self._dirs.clear()
            return self._fs

    def _failed(self, what: str, exc) -> StoreError:
        """The error to raise for a failed Crail call. A lost connection (or no
        answer) also drops the client, at most every RECONNECT_EVERY seconds,
        so a later call connects again: a restarted NameNode or DataNode."""
        text = _text(exc)
        fs = None
        with self._lock:
            self.errors += 1
            self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}: {text}"
            lost = any(w in text.lower() for w in LOST_CONNECTION)
            if lost and time.monotonic() - self._dropped > RECONNECT_EVERY:
                fs, self._fs = self._fs, None
                self._dropped = time.monotonic()
        if fs is not None:
            # Closed later, not now: a NameNode that was only slow (frozen,
            # paused for GC) still answers what it was asked on this
            # connection, and Crail's RPC server (narpc) loses its one
            # dispatcher thread, for every client, when such an answer meets
            # a connection already closed ("Broken pipe" in its log).
            self._dropped_clients.append(fs)
            t = threading.Timer(CLOSE_DROPPED_AFTER, self._close_dropped, args=(fs,))
            t.daemon = True
            t.start()
        log.error("crail %s: %s failed: %s", self.url, what, text)
        return StoreError(f"crail {what}: {text}")

    def _close_dropped(self, fs) -> None:
        with self._lock:
            if fs not in self._dropped_clients:
                return  # closed by close()
            self._dropped_clients.remove(fs)
        _close_quietly(fs)

    def path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/") or not key:
            raise StoreError(f"bad object key {key!r}")
        return f"{self.base}/{key}"

    def _lookup(self, path: str):
        """The node at PATH, None if there is none."""
        fs = self._client()
        try:
            return self._wait(fs.lookup(path))
        except self._j["JException"] as exc:
            raise self._failed(f"lookup {path}", exc) from None

    def _mkdir(self, path: str) -> None:
        if path in self._dirs:
            return
        fs = self._client()
        j = self._j
        if self._lookup(path) is None:
            try:
                node = self._wait(
                    fs.create(
                        path, j["Type"].DIRECTORY, j["Storage"].DEFAULT, j["Location"].DEFAULT, True
                    )
                )
                node.syncDir()
            except j["JException"] as exc:
                text = _text(exc)
                if "exists" not in text:  # made meanwhile by another thread or node
                    if "missing" in text:
                        # the tree changed under us (a Crail restarted empty):
                        # what this store knew it had made, it makes again
                        self._dirs.clear()
                    raise self._failed(f"mkdir {path}", exc) from None
        self._dirs.add(path)

    def _read_into(self, path: str, buf, offset: int) -> int:
        """Bytes of PATH from OFFSET into BUF (a writable buffer): how many."""
        j = self._j
        node = self._lookup(path)
        if node is None:
            raise NotFound(path)
        try:
            f = node.asFile()
            size = f.getCapacity()
            want = max(0, min(len(buf), size - offset))
            if want == 0:
                return 0
            view = memoryview(buf).cast("B")[:want]
            stream = f.getDirectInputStream(size)
            done = 0
            try:
                stream.seek(offset)
                while done < want:
                    # Crail reads straight into BUF's memory (no copy on this
                    # side), one block's piece at a time, each in a buffer of
                    # its own: a read spanning blocks, or a buffer's position,
                    # lands the bytes at the wrong place (Crail 1.1, TCP tier)
                    pos = offset + done
                    end = min(want, done + (pos // self.block + 1) * self.block - pos)
                    piece = view[done:end]
                    cbuf = j["wrap"](j["nio"].convertToDirectBuffer(piece))
                    fut = stream.read(cbuf)
                    n = self._wait(fut).getLen() if fut is not None else 0
                    if n <= 0:
                        break
                    done += n
            finally:
                stream.close()
            return done
        except j["JException"] as exc:
            raise self._failed(f"read {path}", exc) from None

    def _write(self, path: str, source, size: int) -> None:
        """Create PATH holding SIZE bytes that SOURCE(buffer, offset) -> n fills."""
        j = self._j
        fs = self._client()
        # the base too: a Crail restarted empty gets it back at the first write
        self._mkdir(self.base)
        self._mkdir(path.rsplit("/", 1)[0])
        buf = bytearray(min(self.block, max(size, 1)))
        # one direct buffer over BUF's memory for the whole upload
        cbuf = j["wrap"](j["nio"].convertToDirectBuffer(buf))
        try:
            node = self._wait(
                fs.create(
                    path, j["Type"].DATAFILE, j["Storage"].DEFAULT, j["Location"].DEFAULT, True
                )
            )
            node.syncDir()
            stream = node.asFile().getDirectOutputStream(size)
            try:
                off = 0
                while off < size:
                    n = source(memoryview(buf)[: min(len(buf), size - off)], off)
                    if n <= 0:
                        raise StoreError(f"crail write {path}: the source ended at {off}")
                    cbuf.clear()
                    cbuf.limit(n)
                    self._wait(stream.write(cbuf))
                    off += n
            finally:
                stream.close()
        except j["JException"] as exc:
            raise self._failed(f"write {path}", exc) from None

    def _remove(self, path: str) -> bool:
        """Delete PATH; False if it was not there."""
        fs = self._client()
        try:
            node = self._wait(fs.delete(path, False))
        except self._j["JException"] as exc:
            text = _text(exc)
            if "not found" in text.lower() or "GET_FILE_FAILED" in text or "No such" in text:
                return False
            raise self._failed(f"delete {path}", exc) from None
        if node is None:
            return False
        node.syncDir()
        return True

    def _upload_path(self) -> str:
        """Where an upload goes before its rename: this node's own directory,
        so clean_staging finds what a crash left there without a full listing."""
        d = f"{self.base}/{STAGING}/{self.node}"
        for p in (self.base, f"{self.base}/{STAGING}", d):
            self._mkdir(p)
        return f"{d}/{uuid.uuid4().hex}"

    def _publish(self, tmp: str, path: str) -> None:
        """Rename TMP to PATH, replacing what is there (Crail's rename does not)."""
        fs = self._client()
        self._mkdir(path.rsplit("/", 1)[0])
        try:
            for _ in range(PUBLISH_ATTEMPTS):
                if self._lookup(path) is not None:
                    self._remove(path)
                node = self._wait(fs.rename(tmp, path))
                if node is not None:
                    node.syncDir()
                    return
                # refused: another put of the same key (two names of one
                # file refreshing its header) renamed in between; replace it
            raise StoreError(f"crail rename {tmp} to {path}: refused")
        except self._j["JException"] as exc:
            raise self._failed(f"rename {tmp}", exc) from None

    # -- the Store interface ------------------------------------------------------

    @guarded
    def put(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def _put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        tmp = self._upload_path()
        mv = memoryview(data)

        def source(buf, off):
            n = len(buf)
            buf[:] = mv[off : off + n]
            return n

        try:
            self._write(tmp, source, len(data))
            self._publish(tmp, path)
        except BaseException:
            try:
                self._remove(tmp)
            except KvfsError:
                pass
            raise

    def _quietly_remove(self, path: str) -> None:
        try:
            self._run(f"delete {path}", self._remove, path)
        except KvfsError:
            pass

    @guarded
    def get(self, key: str, offset: int = 0, size: int = -1) -> bytes:
        return self._get(key, offset, size)

    def _get(self, key: str, offset: int = 0, size: int = -1) -> bytes:
        path = self.path(key)
        if size < 0:
            node = self._lookup(path)
            if node is None:
                raise NotFound(key)
            size = max(0, node.getCapacity() - offset)
        buf = bytearray(size)
        n = self._read_into(path, buf, offset)
        return bytes(buf) if n == size else bytes(buf[:n])

    @guarded
    def exists(self, key: str) -> bool:
        return self._lookup(self.path(key)) is not None

    @guarded
    def delete(self, key: str) -> None:
        self._remove(self.path(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(self._run("list", self._list, prefix))

    def _list(self, prefix: str) -> "list[str]":
        keys = []
        for sub in self._children(self.base):
            if sub == STAGING:
                continue
            for name in self._children(f"{self.base}/{sub}"):
                key = f"{sub}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def _children(self, path: str) -> "list[str]":
        node = self._lookup(path)
        if node is None:
            return []
        try:
            if not node.getType().isDirectory():
                return []
            return [str(p).rsplit("/", 1)[-1] for p in node.asDirectory().listEntries()]
        except self._j["JException"] as exc:
            raise self._failed(f"list {path}", exc) from None

    @guarded
    def stat(self, key: str) -> ObjectStat:
        node = self._lookup(self.path(key))
        if node is None:
            raise NotFound(key)
        return ObjectStat(node.getCapacity(), node.getModificationTime() / 1000)

    def writer(self, key: str) -> StoreWriter:
        self.path(key)  # checks the key before any byte moves
        return CrailWriter(self, key)

    def reader(self, key: str) -> StoreReader:
        node = self._run(f"open {key}", self._lookup, self.path(key))
        if node is None:
            raise NotFound(key)
        return CrailReader(self, key)

    @guarded
    def rewrite_header(self, key: str, data: bytes) -> None:
        # written once, front to back: a new object with the new head, swapped in
        old = self._get(key)
        self._put(key, bytes(data) + old[len(data) :])

    def clean_staging(self, is_live=None) -> int:
        """Settle this node's commits a crash interrupted (see LocalStore's):
        an object etcd does not reference goes, and so does every staged file
        and every upload left in Crail's staging directory of this node."""
        n = 0
        d = f"{self.base}/{STAGING}/{self.node}"
        try:
            for name in self._run(f"list {d}", self._children, d):
                self._quietly_remove(f"{d}/{name}")
                n += 1
        except KvfsError:
            pass  # Crail not answering: the next start settles them
        for f in os.listdir(self.local.staging_dir):
            key = f.replace("%", "/")
            try:
                if self.exists(key) and not (is_live is not None and is_live(key)):
                    self.delete(key)
            except Exception:
                continue  # cannot tell now: decide at the next start
            try:
                os.unlink(os.path.join(self.local.staging_dir, f))
                n += 1
            except OSError:
                pass
        return n

    def statistics(self) -> dict:
        return {"errors": self.errors, "last_error": self.last_error}

    def close(self) -> None:
        with self._lock:
            fs, self._fs = self._fs, None
            dropped, self._dropped_clients = self._dropped_clients, []
        for c in [fs, *dropped]:
            if c is not None:
                self._workers.submit(_close_quietly, c)
        # a worker stuck on a frozen Crail is left behind, not waited for
        self._workers.shutdown(wait=False, cancel_futures=True)


def _close_quietly(fs) -> None:
    try:
        fs.close()
    except Exception as exc:
        log.debug("closing the crail client: %s", exc)


class CrailReader(StoreReader):
    def __init__(self, store: CrailStore, key: str):
        self._store = store
        self._path = store.path(key)

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.readinto(buf, offset)
        return bytes(buf) if n == size else bytes(buf[:n])

    def readinto(self, buf, offset: int) -> int:
        s = self._store
        return s._run(f"read {self._path}", s._read_into, self._path, buf, offset)

    def close(self) -> None:
        pass


class CrailWriter(LocallyStagedWriter):
    """Staged in a local file; the commit uploads it and renames it into place."""

    def __init__(self, store: CrailStore, key: str):
        self._store = store
        self._key = key
        self._local = store.local.writer(key)
        self._published = False

    def commit(self) -> None:
        s = self._store
        path = s.path(self._key)
        fd = self._local.fileno()
        tmp = []

        def upload():
            tmp.append(s._upload_path())
            s._write(tmp[0], lambda buf, off: os.preadv(fd, [buf], off), self._local.size())
            s._publish(tmp[0], path)

        try:
            s._run(f"commit {self._key}", upload)
        except BaseException:
            if tmp:
                s._quietly_remove(tmp[0])
            self.abort()
            raise
        # the staged file stays, as the intent record, until forget_intent (and
        # the kernel may still read it: the writer's inode is backed by it)
        self._published = True

    def forget_intent(self) -> None:
        self._local.abort()

    def abort(self) -> None:
        self._local.abort()
        if self._published:
            self._store._quietly_remove(self._store.path(self._key))
            self._published = False
