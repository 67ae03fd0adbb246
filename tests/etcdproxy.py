"""A TCP forwarder in front of etcd that a test can switch between failure modes.

Modes:
    pass       forward both ways
    blackhole  accept, but move no byte either way (a network partition: what
               was sent waits in the kernel's buffers and arrives after the
               partition ends, as TCP retransmission would deliver it)
    reset      reset every connection, and each new one as it arrives
    delay      forward each chunk DELAY seconds after it was read

reset_connections() resets the connections of the moment once and keeps the
mode: blackhole then reset_connections() makes clients reconnect into a
partition, so that gRPC waits on a connection that never answers.

One thread does all the work with non-blocking sockets, so a reset is a real
RST sent at once (no other thread holds the socket in a blocking recv).
"""

import select
import socket
import struct
import threading
import time
from collections import deque

MODES = ("pass", "blackhole", "reset", "delay")


class _Conn:
    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        # (due time, bytes) still to write to each side
        self.to_up: deque = deque()
        self.to_client: deque = deque()

    def socks(self):
        return [s for s in (self.client, self.upstream) if s is not None]


def _rst_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class EtcdProxy:
    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.mode = "pass"
        self.delay = 0.0
        self.conns: list[_Conn] = []
        self.accepted = 0
        self.resets = 0
        self._reset_once = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="etcdproxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        # the loop reads both on its next turn; a tuple assignment is atomic enough
        self.delay = delay
        self.mode = mode

    def reset_connections(self) -> None:
        """Reset every connection open now, once; then wait until it is done."""
        self._reset_once = True
        deadline = time.monotonic() + 5
        while self._reset_once and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        for c in self.conns:
            for s in c.socks():
                _rst_close(s)
        self.conns = []
        self.listener.close()

    # -- the loop ------------------------------------------------------------------

    def _drop(self, c: _Conn, rst: bool) -> None:
        for s in c.socks():
            if rst:
                _rst_close(s)
            else:
                s.close()
        if c in self.conns:
            self.conns.remove(c)

    def _run(self) -> None:
        while not self._closed:
            mode, delay = self.mode, self.delay
            if mode == "reset" or self._reset_once:
                self._reset_once = False
                for c in list(self.conns):
                    self._drop(c, rst=True)
                    self.resets += 1
            moving = mode in ("pass", "delay")
            if moving:
                for c in self.conns:
                    if c.upstream is None:
                        self._connect(c)
            rlist = [self.listener]
            wlist = []
            now = time.monotonic()
            if moving:
                for c in self.conns:
                    rlist += c.socks()
                    if c.upstream is not None and c.to_up and c.to_up[0][0] <= now:
                        wlist.append(c.upstream)
                    if c.to_client and c.to_client[0][0] <= now:
                        wlist.append(c.client)
            try:
                r, w, _ = select.select(rlist, wlist, [], 0.01 if delay else 0.05)
            except (OSError, ValueError):
                # a socket closed under us by close(); the next turn rebuilds the lists
                continue
            if self.listener in r:
                self._accept(mode)
            if not moving:
                continue
            now = time.monotonic()
            for c in list(self.conns):
                if c not in self.conns:
                    continue
                for src, queue in ((c.client, c.to_up), (c.upstream, c.to_client)):
                    if src is None or src not in r:
                        continue
                    try:
                        data = src.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(c, rst=False)
                        break
                    queue.append((now + delay, data))
                if c not in self.conns:
                    continue
                for dst, queue in ((c.upstream, c.to_up), (c.client, c.to_client)):
                    if dst is None or dst not in w:
                        continue
                    if not self._flush(dst, queue, now):
                        self._drop(c, rst=True)
                        break

    def _flush(self, dst: socket.socket, queue: deque, now: float) -> bool:
        while queue and queue[0][0] <= now:
            due, data = queue[0]
            try:
                n = dst.send(data)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if n < len(data):
                queue[0] = (due, data[n:])
                return True
            queue.popleft()
        return True

    def _accept(self, mode: str) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                return
            self.accepted += 1
            if mode == "reset":
                self.resets += 1
                _rst_close(sock)
                continue
            sock.setblocking(False)
            self.conns.append(_Conn(sock))

    def _connect(self, c: _Conn) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            self._drop(c, rst=True)
            return
        up.setblocking(False)
        c.upstream = up
