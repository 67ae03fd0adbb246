"""Settings: defaults, a JSON config file (the original's keys accepted), flags.

Precedence: flags > environment (KVFS_*) > config file > defaults.
"""

import json
import os
from dataclasses import dataclass, field, fields

from .errors import KvfsError

DEFAULT_STATE_DIR = "/var/lib/kvfs"


@dataclass
class Config:
    store: str = ""  # "local:DIR"; default DIR is STATE_DIR/store
    etcd: list = field(default_factory=list)  # HOST:PORT...; empty = a private etcd
    etcd_prefix: str = "/kvfs/"
    etcd_timeout: float = 3.0
    etcd_ca_cert: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    ttl: float = 86400.0  # kv_expire_time
    cleanup_interval: float = 3600.0
    capacity: int | None = None
    # the largest file: its per-block checksums (4 bytes a MiB) ride in one
    # etcd value, which etcd caps at 1.5 MiB; 64 GiB keeps it near 350 KB
    max_file_size: int = 64 << 30
    # FUSE passthrough: the kernel moves the bytes of open files itself
    passthrough: bool = True
    # every read served by the daemon and checked against its block checksums
    # (turns passthrough off for reads)
    verify_reads: bool = False
    # a background scrub re-checks stored bytes every scrub_interval seconds
    # (0: never), reading at most scrub_rate bytes/s
    scrub_interval: float = 86400.0
    scrub_rate: int = 64 << 20
    touch_on_read: bool = True
    touch_interval: float | None = None  # default: min(60 s, ttl / 4)
    state_dir: str = DEFAULT_STATE_DIR
    allow_other: bool = False
    read_ahead_kb: int = 1024
    cache_sessions: int = 1024
    cache_layers: int = 65536
    cache_recent: int = 1024
    durable: bool = True
    # the SSD cache: a bounded local directory in front of a remote store
    # (kvfs/store/cached.py); its default directory is STATE_DIR/ssd-cache
    enable_ssd_caching: bool = False
    ssd_cache_dir: str | None = None
    ssd_cache_size: int = 16 << 30
    # reading a layer fetches the session's next PREFETCH_LAYERS into the cache
    enable_prefetch: bool = False
    prefetch_layers: int = 4
    # HOST:PORT (or a bare PORT, on loopback) serving Prometheus /metrics; None: off
    metrics: str | None = None
    debug: bool = False

    def touch_every(self) -> float:
        if self.touch_interval is not None:
            return self.touch_interval
        return min(60.0, self.ttl / 4)

    def store_spec(self) -> str:
        return self.store or f"local:{os.path.join(self.state_dir, 'store')}"


# The original project's kv_transfer_config keys, mapped onto ours.
_ORIGINAL = {
    "kv_expire_time": "ttl",
    "cleanup_interval": "cleanup_interval",
    "etcd_endpoints": "etcd",
    "enable_ssd_caching": "enable_ssd_caching",
    "ssd_cache_dir": "ssd_cache_dir",
    "enable_prefetch": "enable_prefetch",
}
_STORE_KEYS = {"storage_type", "local_dir", "crail_dir", "storage_dir"}


def _coerce(name: str, value, where: str):
    f = {f.name: f for f in fields(Config)}.get(name)
    if f is None:
        raise KvfsError(f"{where}: unknown setting {name!r}")
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if name == "etcd":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of HOST:PORT")
            return value
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if t.startswith("float"):
            v = float(value)
            if v < 0:
                raise ValueError("must not be negative")
            return v
        if t.startswith("int"):
            if value is None:
                return None
            sized = ("capacity", "max_file_size", "scrub_rate", "ssd_cache_size")
            v = parse_size(value) if name in sized else int(value)
            if v < 0:
                raise ValueError("must not be negative")
            return v
        if name == "metrics" and value is not None:
            from .metrics import parse_address

            # a JSON number is a bare port
            value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(value, str):
                raise ValueError("expected HOST:PORT or PORT")
            try:
                parse_address(value)
            except KvfsError:
                raise ValueError("expected HOST:PORT or PORT") from None
            return value
        if value is not None and not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except (TypeError, ValueError) as exc:
        raise KvfsError(f"{where}: bad value {value!r} for {name!r}: {exc}") from None


def parse_size(value) -> int:
    if isinstance(value, int):
        return value
    s = str(value).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def apply_mapping(cfg: Config, data: dict, where: str) -> None:
    tc = data.get("kv_transfer_config")
    rest = {k: v for k, v in data.items() if k != "kv_transfer_config"}
    # "rank"/"local_rank" belong to the original's engine config: harmless here
    for k in ("rank", "local_rank"):
        rest.pop(k, None)
    if tc is not None:
        if not isinstance(tc, dict):
            raise KvfsError(f"{where}: kv_transfer_config must be an object")
        tc = dict(tc)
        stype = tc.pop("storage_type", None)
        local_dir = tc.pop("local_dir", None)
        crail_dir = tc.pop("crail_dir", None)
        storage_dir = tc.pop("storage_dir", None)
        if stype is not None or local_dir or crail_dir:
            stype = stype or "local"
            if stype == "local":
                cfg.store = (
                    f"local:{local_dir or storage_dir or os.path.join(cfg.state_dir, 'store')}"
                )
            elif stype == "crail":
                cfg.store = f"crail:{crail_dir or storage_dir or '/kvfs'}"
            else:
                cfg.store = f"{stype}:{storage_dir or ''}"
        for k, v in tc.items():
            if k in _ORIGINAL:
                setattr(
                    cfg, _ORIGINAL[k], _coerce(_ORIGINAL[k], v, f"{where}: kv_transfer_config.{k}")
                )
            else:
                setattr(cfg, k, _coerce(k, v, f"{where}: kv_transfer_config"))
    for k, v in rest.items():
        if k in _STORE_KEYS:
            raise KvfsError(f"{where}: {k!r} belongs inside kv_transfer_config")
        setattr(cfg, _ORIGINAL.get(k, k), _coerce(_ORIGINAL.get(k, k), v, where))


def load_config(path: str | None, env=None, overrides: dict | None = None) -> Config:
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as exc:
            raise KvfsError(f"cannot read config {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise KvfsError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise KvfsError(f"{path}: expected a JSON object")
        apply_mapping(cfg, data, path)
    env = os.environ if env is None else env
    for f in fields(Config):
        var = "KVFS_" + f.name.upper()
        if var in env:
            setattr(cfg, f.name, _coerce(f.name, env[var], var))
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, _coerce(k, v, f"--{k.replace('_', '-')}"))
    refuse_unbuilt(cfg, path or "settings")
    return cfg


def refuse_unbuilt(cfg: Config, where: str) -> None:
    """A setting that is accepted must work: refuse combinations that cannot."""
    if cfg.enable_prefetch and not cfg.enable_ssd_caching:
        raise KvfsError(
            f"{where}: enable_prefetch fetches the following layers into the SSD cache: "
            "set enable_ssd_caching (--ssd-cache DIR) too, or remove enable_prefetch"
        )
    if cfg.enable_ssd_caching and cfg.ssd_cache_size == 0:
        raise KvfsError(f"{where}: ssd_cache_size 0 holds nothing; give a size (e.g. 64G)")
    if cfg.enable_prefetch and cfg.prefetch_layers == 0:
        raise KvfsError(f"{where}: prefetch_layers 0 fetches nothing; give 1 or more")


def ssd_cache_dir(cfg: Config) -> str:
    return cfg.ssd_cache_dir or os.path.join(cfg.state_dir, "ssd-cache")
