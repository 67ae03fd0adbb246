"""Shared fixtures: a real etcd, a real kvfs mount."""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mount:
    """A mounted kvfs as a test sees it."""

    path: Path

    def status(self) -> dict:
        out = subprocess.run(
            [str(ROOT / ".venv/bin/kvfs"), "status", "--json", str(self.path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out)


@pytest.fixture
def kvfs_mount(tmp_path):
    # Placeholder until the daemon lands: a plain directory with the same shape.
    d = tmp_path / "kvcache"
    d.mkdir()
    yield Mount(d)
