"""The kvfs exception tree; every member carries the errno a user sees.

    KvfsError
    ├── InvalidName          EINVAL / ENAMETOOLONG
    ├── NotFound             ENOENT
    ├── Exists               EEXIST
    ├── NotEmpty             ENOTEMPTY
    ├── NotPermitted         EPERM
    ├── NoSpace              ENOSPC
    ├── Corrupt              EIO      (a stored object fails validation)
    ├── StoreError           EIO      (the backing store failed)
    └── MetaUnavailable      ETIMEDOUT (etcd unreachable or too slow)

The FUSE operations class is the one place that turns these into FUSEError.
"""

import errno


class KvfsError(Exception):
    errno = errno.EIO

    def __init__(self, message: str = "", err: int | None = None):
        super().__init__(message)
        if err is not None:
            self.errno = err


class InvalidName(KvfsError):
    errno = errno.EINVAL


class NotFound(KvfsError):
    errno = errno.ENOENT


class Exists(KvfsError):
    errno = errno.EEXIST


class NotEmpty(KvfsError):
    errno = errno.ENOTEMPTY


class NotPermitted(KvfsError):
    errno = errno.EPERM


class NoSpace(KvfsError):
    errno = errno.ENOSPC


class Corrupt(KvfsError):
    errno = errno.EIO


class StoreError(KvfsError):
    errno = errno.EIO


class MetaUnavailable(KvfsError):
    errno = errno.ETIMEDOUT


class Conflict(KvfsError):
    """A compare-and-swap lost a race; callers retry."""

    errno = errno.EAGAIN
