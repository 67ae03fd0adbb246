"""The one place where errors cross from kvfs into the kernel, and are counted.

Every FUSE handler of `Operations` is wrapped by `fuse_operation`:

- `pyfuse3.FUSEError` passes through (a handler chose the errno);
- a `KvfsError` becomes `FUSEError(exc.errno)`, the cause kept;
- any other exception is a bug: logged with its traceback, answered with
  `EIO`, and the mount keeps serving. A read-only failsafe (as S3QL has) buys
  nothing here: every change is one etcd transaction, so a failed request
  leaves no half-applied state for later requests to build on.
- `trio.Cancelled` is never swallowed.

Each is counted per operation and errno; `OpStats.statistics()` feeds `kvfs status`.
"""

import errno
import functools
import logging
import time
from collections import Counter, defaultdict

import pyfuse3
import trio

from ..errors import KvfsError

log = logging.getLogger(__name__)


class OpStats:
    """Per FUSE operation: calls, total and peak seconds, errors by errno."""

    def __init__(self):
        self.time = defaultdict(lambda: [0, 0.0, 0.0])
        self.errors: dict[str, Counter] = defaultdict(Counter)
        # (op, seconds) -> None, e.g. the `--metrics` latency histogram: means
        # and peaks give no quantiles
        self.observe = None

    def record(self, op: str, seconds: float, err: int | None) -> None:
        if self.observe is not None:
            self.observe(op, seconds)
        s = self.time[op]
        s[0] += 1
        s[1] += seconds
        s[2] = max(s[2], seconds)
        if err is not None:
            self.errors[op][err] += 1

    def statistics(self) -> dict:
        out = {}
        for op, (n, total, peak) in sorted(self.time.items()):
            if not n:
                continue
            errs = self.errors.get(op, Counter())
            out[op] = {
                "count": n,
                "mean_ms": round(1000 * total / n, 3),
                "max_ms": round(1000 * peak, 3),
                "errors": sum(errs.values()),
                "errnos": {errno.errorcode.get(e, str(e)): c for e, c in sorted(errs.items())},
            }
        return out


def fuse_operation(fn):
    """Map errors to errnos, count them and time the call (see the module docstring)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        err = None
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            err = exc.errno
            raise
        except trio.Cancelled:
            raise
        except KvfsError as exc:
            err = exc.errno
            raise pyfuse3.FUSEError(exc.errno) from exc
        except Exception as exc:
            err = errno.EIO
            log.exception("internal error in %s; answered EIO, the mount stays up", op)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        finally:
            self.op_stats.record(op, time.perf_counter() - t0, err)

    return wrapper
