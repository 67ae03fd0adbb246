"""Scheduler side: find the longest cached prefix of each prompt, plan loads and saves.

The scheduler never reads KV. It hashes each prompt into chunk links, checks
(off the scheduler thread) which chunk files exist under the request's session
for every parallel rank, and tells the workers, step by step, which chunks to
load into which blocks and which newly computed chunks to save. It knows
requests only as plain `PromptInfo`; the vLLM facade translates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from .cachedir import CacheDir, shared_index
from .counters import Counters
from .fingerprint import weights_fingerprint
from .keys import KeySpace, chain, chain_root, derived_session, token_chain, valid_session
from .plan import ChunkOp, StepPlan
from .settings import RequestOptions, Settings

# How long the scheduler thread may wait for lookups in one engine step, all
# requests together, before telling vLLM to ask again next step: enough for a
# lookup of cached names (hashing and a stat a chunk: ~1-3 ms for 1-4k tokens
# while the waiting thread leaves the lookup the GIL), while a slow mount
# (names not cached, etcd far away) delays a step by at most this much
# however many requests arrive. An answer deferred costs the request an
# engine step and more asks, in which the lookup competes for the GIL.
LOOKUP_WAIT_SECONDS = 0.005


@dataclass
class PromptInfo:
    """What the scheduler needs to know of a request, as plain data."""

    req_id: str
    token_ids: list[int] | None  # None: no token ids to key the KV by (prompt embeddings)
    params: dict | None = None  # the request's kv_transfer_params
    lora: tuple[str, str] | None = None  # a LoRA adapter's (name, local path)
    extra: list[str] = field(default_factory=list)  # other inputs that shape the KV


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
    local: int = 0  # tokens vLLM had in its own prefix cache, as last looked up
    saved_chunks: int = 0  # chunks [0, saved_chunks) are stored or being stored
    tail_saved: bool = False
    # The whole chunk holding the last token (computed, never loaded) is in the
    # request's session already, as of the last lookup: a hit need not save it.
    last_stored: bool = False
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


@dataclass
class _Lookup:
    """A lookup in flight: its state (new, or the request's) and the tokens
    [0, hit_end) found cached, scanning from `start`."""

    start: int
    future: Future  # of (_Req | None, hit_end)


class SchedulerSide:
    def __init__(
        self,
        settings: Settings,
        spaces: list[KeySpace],
        block_size: int,
        log: logging.Logger,
        cache: CacheDir | None = None,
    ):
        self.settings = settings
        self.spaces = spaces  # one per (tp, pp) rank; files of all must exist for a hit
        self.chunk = spaces[0].chunk_size
        self.block_size = block_size
        self.log = log
        self.stats = Counters()
        self.cache = cache or CacheDir(
            settings.mount, require_kvfs=settings.require_kvfs, counters=self.stats, log=log
        )
        self._reqs: dict[str, _Req | None] = {}  # None: a request the cache cannot serve
        self._lookups: dict[str, _Lookup] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvfs-lookup")
        self._wait_left = LOOKUP_WAIT_SECONDS  # this step's; renewed by build_plan
        self._block_ids_of: Callable[[str], list[int]] = lambda req_id: []
        self._unresolved_lora: set[str] = set()
        # Every session of this configuration shares one index directory:
        # lookups look in the request's session, then in the index.
        self.index = shared_index(self.cache, spaces[0], log)

    def bind(self, block_ids_of: Callable[[str], list[int]]) -> None:
        """How to find a request's blocks (vLLM's KV cache manager knows)."""
        self._block_ids_of = block_ids_of

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    # -- lookups (the work runs on the lookup thread) -----------------------------

    def _new_state(self, info: PromptInfo) -> _Req | None:
        if info.token_ids is None:
            return None
        opts, problems = RequestOptions.parse(info.params)
        for p in problems:
            self.log.warning("kvfs: request %s: %s; the default is used", info.req_id, p)
        extra = list(info.extra)
        if info.lora is not None:
            name, path = info.lora
            fingerprint = weights_fingerprint(path)
            if fingerprint is None:
                # Not knowing the weights, the KV cannot be keyed safely.
                if path not in self._unresolved_lora:
                    self._unresolved_lora.add(path)
                    self.log.warning(
                        "kvfs: LoRA adapter %s: no weight files at %r, its requests are not cached",
                        name,
                        path,
                    )
                return None
            extra.insert(0, f"lora={fingerprint}")
        prompt = list(info.token_ids)
        links = token_chain(prompt, self.chunk, extra)
        session = opts.session
        if session is not None and not valid_session(session):
            self.log.warning("kvfs: request %s: bad session name %r", info.req_id, session)
            session = None
        if session is None:
            if not links:
                return None  # shorter than a chunk: nothing to cache
            # No session named: the chunks go into the index itself (they live
            # until they expire), or, not sharing, a session of its first chunk.
            session = self.index or derived_session(self.spaces[0].model, links[0])
        root = chain_root(extra)
        loadable = max(0, len(prompt) - 1) // self.chunk
        tail = max(0, len(prompt) - 1) // self.block_size * self.block_size - loadable * self.chunk
        start = loadable * self.chunk
        parent = links[loadable - 1] if loadable else root
        tail_link = chain(parent, prompt[start : start + tail]) if tail else b""
        return _Req(session, prompt, links, root, opts.store, opts.load, loadable, tail, tail_link)

    def _exists(self, st: _Req, index: int, link: bytes, num_tokens: int = 0) -> bool:
        """Whether every rank has this chunk, in the request's session or, stored
        by any other session or request, in the index."""
        places = [st.session]
        if self.index is not None and st.session != self.index:
            places.append(self.index)
        return all(
            any(self.cache.exists(p, s.file_name(index, link, num_tokens)) for p in places)
            for s in self.spaces
        )

    def _hit_end(self, st: _Req, start: int) -> int:
        """Tokens [0, end) cached for every rank, scanning chunks from `start`'s."""
        if not st.load or not self.cache.live():
            return 0
        i = start // self.chunk
        while i < st.loadable and self._exists(st, i, st.links[i]):
            i += 1
        end = i * self.chunk
        if i == st.loadable and start < end + st.tail_tokens:
            if self._exists(st, i, st.tail_link, st.tail_tokens):
                end += st.tail_tokens
        # A prompt of whole chunks ends in one that a hit computes the end of:
        # saved by an earlier request, it would be copied out and written
        # again (and skipped) at every hit. Only the session's own copy counts:
        # an index copy is linked into the session by the save.
        st.last_stored = (
            i == st.loadable
            and end == i * self.chunk + st.tail_tokens
            and len(st.links) > i
            and all(self.cache.exists(st.session, s.file_name(i, st.links[i])) for s in self.spaces)
        )
        return end

    def _lookup(self, st: _Req | None, info: PromptInfo | None, start: int):
        if st is None and info is not None:
            st = self._new_state(info)
        return st, (self._hit_end(st, start) if st is not None else 0)

    # -- vLLM's questions (on the scheduler thread) --------------------------------

    def get_num_new_matched_tokens(
        self, req_id: str, num_computed_tokens: int, describe: Callable[[], PromptInfo]
    ) -> tuple[int | None, bool]:
        """Tokens beyond `num_computed_tokens` the cache can supply, or None
        while the chunk files are still being checked (vLLM asks again)."""
        if req_id in self._reqs:
            st = self._reqs[req_id]
            if st is None or not st.load:
                return 0, False
        look = self._lookups.get(req_id)
        if look is None or look.start > num_computed_tokens:
            st = self._reqs.get(req_id)
            info = describe() if req_id not in self._reqs else None
            future = self._pool.submit(self._lookup, st, info, num_computed_tokens)
            look = self._lookups[req_id] = _Lookup(num_computed_tokens, future)
            if not self._wait(look):
                self.stats.add("lookups_deferred", 1)
                return None, False
        elif not look.future.done():
            # Wait again, within the step's budget: an engine with nothing else
            # to run asks in a tight loop that holds the GIL, and the lookup
            # thread, which needs it back after each stat, then advanced one
            # stat per switch interval (5 ms).
            if not self._wait(look):
                return None, False
        # A result is used once: should the request not be allocated now, the
        # next call looks again rather than trust files that may be gone.
        del self._lookups[req_id]
        st, hit_end = look.future.result()
        self._reqs[req_id] = st
        if st is None:
            return 0, False
        st.local = num_computed_tokens
        return max(0, hit_end - num_computed_tokens), False

    def _wait(self, look: _Lookup) -> bool:
        """Wait for a lookup out of this step's budget: whether it is done."""
        t0 = time.perf_counter()
        try:
            look.future.result(timeout=max(0.0, self._wait_left))
            done = True
        except FutureTimeout:
            done = False
        self._wait_left -= time.perf_counter() - t0
        return done

    def update_state_after_alloc(
        self, req_id: str, block_ids: list[int], num_external_tokens: int
    ) -> None:
        st = self._reqs.get(req_id)
        if st is None:
            return
        local = st.local
        if num_external_tokens > 0:
            end = local + num_external_tokens
            st.block_ids = list(block_ids)
            st.pending_load = (local, num_external_tokens)
            st.saved_chunks = max(st.saved_chunks, end // self.chunk)
            if st.last_stored and end == st.loadable * self.chunk + st.tail_tokens:
                st.saved_chunks = max(st.saved_chunks, st.loadable + 1)
            if end % self.chunk:
                st.tail_saved = True
        if not st.counted:
            st.counted = True
            st.hit_tokens = num_external_tokens
            st.miss_tokens = max(0, len(st.prompt) - local - num_external_tokens)
            self.stats.add("requests", 1)
            if st.hit_tokens:
                self.stats.add("hits", 1)
            self.stats.add("hit_tokens", st.hit_tokens)
            self.stats.add("miss_tokens", st.miss_tokens)
            self.log.info(
                "kvfs: request %s session %s: %d prompt tokens, %d hit in the cache "
                "(%d files), %d cached locally, %d to compute",
                req_id,
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

    def _plan_loads(self, plan: StepPlan) -> None:
        bs, per_chunk = self.block_size, self.chunk // self.block_size
        for req_id, st in self._reqs.items():
            if st is None or st.pending_load is None:
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

    def _plan_saves(self, plan: StepPlan, req_id: str, st: _Req, after: int) -> None:
        """Save the chunks that `after` computed tokens complete, and no more."""
        bs, per_chunk = self.block_size, self.chunk // self.block_size
        done = after // self.chunk
        tail_done = (
            st.tail_tokens
            and not st.tail_saved
            and after >= st.loadable * self.chunk + st.tail_tokens
        )
        if done <= st.saved_chunks and not tail_done:
            return
        block_ids = self._block_ids_of(req_id)
        for i in range(st.saved_chunks, done):
            op = self._op(req_id, st, i, block_ids, False, with_tokens=True, repair=st.repairs(i))
            if len(op.block_ids) == per_chunk:
                plan.saves.append(op)
        st.saved_chunks = max(st.saved_chunks, done)
        if tail_done:
            i = st.loadable
            op = self._op(req_id, st, i, block_ids, True, with_tokens=True, repair=st.repairs(i))
            if len(op.block_ids) * bs == st.tail_tokens:
                plan.saves.append(op)
            st.tail_saved = True

    def build_plan(
        self, progress: dict[str, tuple[int, int]], finished: Iterable[str] = ()
    ) -> StepPlan:
        """The step's plan; `progress` maps each scheduled request to (tokens
        computed before this step, tokens scheduled in it)."""
        self._wait_left = LOOKUP_WAIT_SECONDS  # the plan ends a step's scheduling
        plan = StepPlan(finished=sorted(finished))
        self._plan_loads(plan)
        for req_id, (before, scheduled) in progress.items():
            st = self._reqs.get(req_id)
            if st is not None and st.store:
                self._plan_saves(plan, req_id, st, min(before + scheduled, len(st.prompt)))
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
            if st is None or not st.block_ids or invalid_block_ids.isdisjoint(st.block_ids):
                continue
            first = next(j for j, b in enumerate(st.block_ids) if b in invalid_block_ids)
            chunk = first // per_chunk
            lost = max(0, st.local + st.hit_tokens - chunk * self.chunk)
            lost = min(lost, st.hit_tokens)
            st.hit_tokens -= lost
            st.miss_tokens += lost
            self.stats.add("hit_tokens", -lost)
            # hit_tokens' total stays the tokens that really loaded; this keeps
            # an interval's Prometheus counter from having to go down
            self.stats.add("revoked_tokens", lost)
            self.stats.add("miss_tokens", lost)
            st.repair_from = chunk if st.repair_from is None else min(st.repair_from, chunk)
            st.saved_chunks = min(st.saved_chunks, chunk)
            st.tail_saved = False

    def request_finished(self, req_id: str) -> dict | None:
        self._lookups.pop(req_id, None)  # a lookup still running is dropped on arrival
        st = self._reqs.pop(req_id, None)
        if st is None:
            return None
        return {
            "kvfs_session": st.session,
            "kvfs_hit_tokens": st.hit_tokens,
            "kvfs_miss_tokens": st.miss_tokens,
        }
