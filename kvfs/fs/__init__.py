"""The FUSE filesystem: `Operations` translates; each concern below it has a module."""

from .inodes import ROOT
from .kernel import Kernel
from .operations import Operations

__all__ = ["ROOT", "Kernel", "Operations"]
