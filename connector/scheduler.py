"""Scheduler side: find the longest cached prefix of each prompt, plan loads and saves.

The scheduler never reads KV. It hashes each prompt into chunk links, checks
which chunk files exist under the request's session (for every parallel
rank), and tells the workers, step by step, which chunks to load into which
blocks and which newly computed chunks to save.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .keys import KeySpace, chain, chain_root, derived_session, token_chain, valid_session
from .plan import ChunkOp, StepPlan
from .settings import Settings
from .stats import Counters


@dataclass
class _Req:
    session: str
    prompt: list[int]
    links: list[bytes]  # one per whole chunk of the prompt
    root: bytes
    store: bool
    load: bool
    # A hit may cover `loadable` whole chunks, then `tail_tokens` more (whole
    # blocks, stored as one short file): never the prompt's last token, which
    # vLLM must compute to sample from.
    loadable: int
    tail_tokens: int
    tail_link: bytes
    hit_end: int = 0  # tokens [0, hit_end) are in the cache, as last looked up
    local: int = 0  # tokens vLLM had in its own prefix cache, as last looked up
    saved_chunks: int = 0  # chunks [0, saved_chunks) are stored or being stored
    tail_saved: bool = False
    pending_load: tuple[int, int] | None = None  # (local tokens, external tokens)
    hit_tokens: int = 0
    miss_tokens: int = 0
    counted: bool = False
    block_ids: list[int] = field(default_factory=list)
    # After a failed load, chunks from this one on are recomputed and stored
    # again over whatever files exist: those may hold KV computed on top of it.
    repair_from: int | None = None

    def parent(self, index: int) -> bytes:
        return self.links[index - 1] if index else self.root

    def repairs(self, index: int) -> bool:
        return self.repair_from is not None and index >= self.repair_from


def request_options(params: dict | None) -> tuple[str | None, bool, bool]:
    """(session, load, store) from a request's kv_transfer_params."""
    params = params or {}
    return (
        params.get("kvfs_session"),
        bool(params.get("kvfs_load", True)),
        bool(params.get("kvfs_store", True)),
    )


class SchedulerSide:
    def __init__(self, settings: Settings, spaces: list[KeySpace], block_size: int, log):
        self.settings = settings
        self.spaces = spaces  # one per (tp, pp) rank; files of all must exist for a hit
        self.chunk = spaces[0].chunk_size
        self.block_size = block_size
        self.log = log
        self.stats = Counters()
        self._reqs: dict[str, _Req] = {}
        self._kv_cache_manager = None

    def bind(self, kv_cache_manager) -> None:
        self._kv_cache_manager = kv_cache_manager

    # -- lookups ---------------------------------------------------------------

    def _state(self, request) -> _Req | None:
        st = self._reqs.get(request.request_id)
        if st is not None:
            return st
        prompt = request.prompt_token_ids
        if prompt is None or getattr(request, "prompt_embeds", None) is not None:
            return None  # no token ids to key the KV by
        session, load, store = request_options(request.kv_transfer_params)
        extra = []
        if getattr(request, "lora_request", None) is not None:
            extra.append(f"lora={request.lora_request.lora_name}")
        for f in getattr(request, "mm_features", None) or []:
            extra.append(f"mm={f.identifier}")
        if getattr(request, "cache_salt", None):
            extra.append(f"salt={request.cache_salt}")
        prompt = list(prompt)
        links = token_chain(prompt, self.chunk, extra)
        if session is not None and not valid_session(session):
            self.log.warning("kvfs: request %s: bad session name %r", request.request_id, session)
            session = None
        if session is None:
            if not links:
                return None  # shorter than a chunk: nothing to cache
            session = derived_session(self.spaces[0].model, links[0])
        root = chain_root(extra)
        loadable = max(0, len(prompt) - 1) // self.chunk
        tail = max(0, len(prompt) - 1) // self.block_size * self.block_size - loadable * self.chunk
        start = loadable * self.chunk
        parent = links[loadable - 1] if loadable else root
        tail_link = chain(parent, prompt[start : start + tail]) if tail else b""
        st = _Req(session, prompt, links, root, store, load, loadable, tail, tail_link)
        self._reqs[request.request_id] = st
        return st

    def _exists(self, st: _Req, index: int, link: bytes, num_tokens: int = 0) -> bool:
        d = os.path.join(self.settings.mount, st.session)
        return all(
            os.path.exists(os.path.join(d, s.file_name(index, link, num_tokens)))
            for s in self.spaces
        )

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        if st is None or not st.load:
            return 0, False
        i = num_computed_tokens // self.chunk
        while i < st.loadable and self._exists(st, i, st.links[i]):
            i += 1
        st.hit_end = i * self.chunk
        if i == st.loadable and num_computed_tokens < i * self.chunk + st.tail_tokens:
            if self._exists(st, i, st.tail_link, st.tail_tokens):
                st.hit_end += st.tail_tokens
        st.local = num_computed_tokens
        return max(0, st.hit_end - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        local = st.local
        if num_external_tokens > 0:
            end = local + num_external_tokens
            st.block_ids = list(blocks.get_block_ids()[0])
            st.pending_load = (local, num_external_tokens)
            st.saved_chunks = max(st.saved_chunks, end // self.chunk)
            if end % self.chunk:
                st.tail_saved = True
        if not st.counted:
            st.counted = True
            st.hit_tokens = num_external_tokens
            st.miss_tokens = max(0, len(st.prompt) - local - num_external_tokens)
            self.stats.add("requests", 1)
            self.stats.add("hit_tokens", st.hit_tokens)
            self.stats.add("miss_tokens", st.miss_tokens)
            self.log.info(
                "kvfs: request %s session %s: %d prompt tokens, %d hit in the cache "
                "(%d files), %d cached locally, %d to compute",
                request.request_id,
                st.session,
                len(st.prompt),
                st.hit_tokens,
                -(-st.hit_tokens // self.chunk),
                local,
                st.miss_tokens,
            )

    # -- the step's plan -------------------------------------------------------

    def _op(self, req_id: str, st: _Req, index: int, block_ids: list[int], tail: bool, **kw):
        per_chunk = self.chunk // self.block_size
        n = st.tail_tokens if tail else self.chunk
        first = index * per_chunk
        start = index * self.chunk
        return ChunkOp(
            req_id=req_id,
            session=st.session,
            index=index,
            link=(st.tail_link if tail else st.links[index]).hex(),
            parent=st.parent(index).hex(),
            block_ids=block_ids[first : first + n // self.block_size],
            num_tokens=st.tail_tokens if tail else 0,
            tokens=st.prompt[start : start + n] if kw.pop("with_tokens", False) else [],
            **kw,
        )

    def build_plan(self, scheduler_output) -> StepPlan:
        plan = StepPlan(finished=sorted(scheduler_output.finished_req_ids or ()))
        bs = self.block_size
        per_chunk = self.chunk // bs
        for req_id, st in self._reqs.items():
            if st.pending_load is None:
                continue
            local, external = st.pending_load
            st.pending_load = None
            end = local + external
            for i in range(local // self.chunk, end // self.chunk):
                skip = max(0, local // bs - i * per_chunk)
                plan.loads.append(self._op(req_id, st, i, st.block_ids, False, skip_blocks=skip))
            if end % self.chunk:
                i = end // self.chunk
                skip = max(0, local // bs - i * per_chunk)
                plan.loads.append(self._op(req_id, st, i, st.block_ids, True, skip_blocks=skip))

        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, n in zip(cached.req_ids, cached.num_computed_tokens, strict=False):
            computed[req_id] = n
        for req_id, before in computed.items():
            st = self._reqs.get(req_id)
            if st is None or not st.store:
                continue
            after = min(
                before + scheduler_output.num_scheduled_tokens.get(req_id, 0), len(st.prompt)
            )
            done = after // self.chunk
            tail_done = (
                st.tail_tokens
                and not st.tail_saved
                and after >= st.loadable * self.chunk + st.tail_tokens
            )
            if done <= st.saved_chunks and not tail_done:
                continue
            block_ids = self._block_ids(req_id)
            for i in range(st.saved_chunks, done):
                op = self._op(req_id, st, i, block_ids, False, with_tokens=True)
                op.repair = st.repairs(i)
                if len(op.block_ids) == per_chunk:
                    plan.saves.append(op)
            st.saved_chunks = max(st.saved_chunks, done)
            if tail_done:
                op = self._op(req_id, st, st.loadable, block_ids, True, with_tokens=True)
                op.repair = st.repairs(st.loadable)
                if len(op.block_ids) * bs == st.tail_tokens:
                    plan.saves.append(op)
                st.tail_saved = True
        return plan

    def update_connector_output(self, invalid_block_ids: set[int] | None) -> None:
        """After a failed load: count the lost hit as a miss, and save the
        recomputed chunks again, replacing the file that failed and every later
        one (the worker dropped what this step computed on top of it, but a file
        may exist from another request that read the same bad chunk)."""
        if not invalid_block_ids:
            return
        per_chunk = self.chunk // self.block_size
        for st in self._reqs.values():
            if not st.block_ids or invalid_block_ids.isdisjoint(st.block_ids):
                continue
            first = next(j for j, b in enumerate(st.block_ids) if b in invalid_block_ids)
            chunk = first // per_chunk
            lost = max(0, st.local + st.hit_tokens - chunk * self.chunk)
            lost = min(lost, st.hit_tokens)
            st.hit_tokens -= lost
            st.miss_tokens += lost
            self.stats.add("hit_tokens", -lost)
            self.stats.add("miss_tokens", lost)
            st.repair_from = chunk if st.repair_from is None else min(st.repair_from, chunk)
            st.saved_chunks = min(st.saved_chunks, chunk)
            st.tail_saved = False

    def _block_ids(self, req_id: str) -> list[int]:
        if self._kv_cache_manager is None:
            return []
        return list(self._kv_cache_manager.get_block_ids(req_id)[0])

    def request_finished(self, request) -> dict | None:
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return None
        return {
            "kvfs_session": st.session,
            "kvfs_hit_tokens": st.hit_tokens,
            "kvfs_miss_tokens": st.miss_tokens,
        }
