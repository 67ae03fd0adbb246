"""What the scheduler side tells the worker side each step: chunks to load and to save.

Plain dataclasses of ints, strings and lists, so they cross process boundaries
as cheaply as vLLM's own scheduler output.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChunkOp:
    """One chunk of one request: where its file is and which paged blocks hold it."""

    req_id: str
    session: str
    index: int  # chunk number within the request's tokens
    link: str  # hex token-chain link of the prefix ending with this chunk
    parent: str  # hex link of the prefix before it
    block_ids: list[int]  # the paged blocks of this chunk, in token order
    tokens: list[int] = field(default_factory=list)  # token ids (saves only)
    skip_blocks: int = 0  # loads: leading blocks already computed locally
    # saves: recomputed after a failed load; replaces a file that exists, which
    # may be the damaged one or one computed on top of it
    repair: bool = False
    num_tokens: int = 0  # tokens in the file if fewer than a chunk (a prompt's tail)


@dataclass
class StepPlan:
    loads: list[ChunkOp] = field(default_factory=list)
    saves: list[ChunkOp] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests that ended before this step
