"""Validation of session and layer names."""

import errno

from .errors import InvalidName

NAME_MAX = 255


def check_name(name: bytes) -> str:
    """Return NAME as str if it is a valid session or layer name, else raise."""
    if not name or name in (b".", b".."):
        raise InvalidName(f"invalid name {name!r}")
    if b"/" in name or b"\0" in name:
        raise InvalidName(f"invalid name {name!r}")
    if len(name) > NAME_MAX:
        raise InvalidName(f"name longer than {NAME_MAX} bytes", errno.ENAMETOOLONG)
    try:
        # etcd keys and JSON headers carry names as text; refusing undecodable
        # bytes keeps every name printable in `ls` and in recovery.
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"name is not UTF-8: {name!r}") from None
