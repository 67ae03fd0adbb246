"""KVFSConnector: the vLLM V1 facade; it translates vLLM's objects and forwards to the core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.distributed.utils import get_pp_indices
from vllm.logger import init_logger

from .counters import FIELDS
from .fingerprint import checkpoint_fingerprint
from .keys import KeySpace
from .plan import StepPlan
from .scheduler import PromptInfo, SchedulerSide
from .settings import Settings, chunk_tokens
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Out-of-tree loggers only reach vLLM's handlers under the "vllm." prefix.
logger = init_logger("vllm." + __name__)


class KVFSConnectorMetadata(KVConnectorMetadata, StepPlan):
    """The step plan, as the metadata type vLLM passes from scheduler to workers."""


class KVFSStats(KVConnectorStats):
    """Sums of the counters in counters.FIELDS over an interval."""

    def __init__(self, data: dict[str, Any] | None = None):
        super().__init__(data=dict(data or {}))

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVFSStats:
        for k, v in (other.data or {}).items():
            if isinstance(v, int | float):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVFSPromMetrics(KVConnectorPromMetrics):
    """The counters as vLLM's own Prometheus metrics, vllm:kvfs_<name>_total,
    labelled as vLLM labels its engines (model_name, engine).

    vLLM calls `observe` with each interval's KVFSStats data, summed over the
    workers and the scheduler; a counter only ever goes up, so the interval's
    hit tokens are counted before revocation (revoked_tokens says how many
    were recomputed after all).
    """

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {}
        for name, doc in FIELDS.items():
            counter = self._counter_cls(
                name=f"vllm:kvfs_{name}",
                documentation=f"kvfs connector: {doc}",
                labelnames=labelnames,
            )
            self.counters[name] = {
                idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = dict(transfer_stats_data)
        data["hit_tokens"] = data.get("hit_tokens", 0) + data.get("revoked_tokens", 0)
        for name, value in data.items():
            per_engine = self.counters.get(name)
            if per_engine is not None and isinstance(value, int | float) and value > 0:
                per_engine[engine_idx].inc(value)


_unknown_weights: set[str] = set()


def _weights(mc, vllm_config) -> str | None:
    """The fingerprint of the model's checkpoint (fingerprint.py), so that new
    weights under the same name or path never load the old weights' KV."""
    load = getattr(vllm_config, "load_config", None)
    fp = checkpoint_fingerprint(
        mc.model, getattr(mc, "revision", None), getattr(load, "download_dir", None)
    )
    if fp is None and mc.model not in _unknown_weights:
        _unknown_weights.add(mc.model)
        logger.warning(
            "kvfs: no checkpoint files found for %s (not a local path, not in the Hugging "
            "Face cache): its keys carry its name and revision only; set model_id in "
            "kv_connector_extra_config to a name that changes with its weights",
            mc.model,
        )
    return fp


def vllm_key_space(vllm_config: VllmConfig, settings: Settings, tp_rank: int, pp_rank: int):
    """The key space of one rank, computed from the configuration alone, so the
    scheduler (which never sees the tensors) and every worker agree on names.
    A rank's layers come from vLLM's own split for that rank (get_pp_indices),
    never from the calling process's rank: with an uneven split the ranks hold
    different numbers of layers."""
    from vllm.platforms import current_platform

    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    cc = vllm_config.cache_config
    if cc.cache_dtype in (None, "auto"):
        dtype = str(mc.dtype).removeprefix("torch.")
    else:
        dtype = str(cc.cache_dtype)
    block_size = cc.block_size
    layout = (
        f"vllm:{current_platform.device_type}:BHNC:block{block_size}"
        f":kvheads{mc.get_num_kv_heads(pc)}:head{mc.get_head_size()}"
    )
    pp_size = pc.pipeline_parallel_size
    first, end = get_pp_indices(mc.get_total_num_hidden_layers(), pp_rank, pp_size)
    extra = []
    if not settings.model_id:  # the operator's model_id is the identity as given
        weights = _weights(mc, vllm_config)
        if weights is not None:
            extra.append(("weights", weights))
    if getattr(mc, "revision", None):
        extra.append(("revision", str(mc.revision)))
    if getattr(mc, "quantization", None):
        extra.append(("quantization", str(mc.quantization)))
    if pp_size > 1:  # two splits can give a rank as many layers, but not the same ones
        extra.append(("layers", f"{first}-{end}"))
    return KeySpace(
        model=settings.model_id or mc.model,
        dtype=dtype,
        layout=layout,
        chunk_size=chunk_tokens(settings, block_size),
        num_layers=end - first,
        tp_rank=tp_rank,
        tp_size=pc.tensor_parallel_size,
        pp_rank=pp_rank,
        pp_size=pp_size,
        extra=tuple(extra),
    )


def prompt_info(request: Request) -> PromptInfo:
    """What the scheduler core needs of a vLLM request."""
    tokens = request.prompt_token_ids
    if getattr(request, "prompt_embeds", None) is not None:
        tokens = None  # no token ids to key the KV by
    lora = request.lora_request
    extra = [f"mm={f.identifier}" for f in getattr(request, "mm_features", None) or []]
    if getattr(request, "cache_salt", None):
        extra.append(f"salt={request.cache_salt}")
    return PromptInfo(
        req_id=request.request_id,
        token_ids=tokens,
        params=request.kv_transfer_params,
        lora=(lora.lora_name, lora.lora_path) if lora is not None else None,
        extra=extra,
    )


class KVFSConnector(KVConnectorBase_V1):
    """Stores KV caches as safetensors chunk files under a kvfs mount and loads
    the longest cached prefix of each prompt back into vLLM's paged cache."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = Settings.from_extra_config(extra)
        # A cache is best effort: a chunk that fails to load is recomputed, not
        # an error for the request. The scheduler reads this after building us.
        self._kv_transfer_config.kv_load_failure_policy = self.settings.load_failure_policy
        pc = vllm_config.parallel_config
        block_size = vllm_config.cache_config.block_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            spaces = [
                vllm_key_space(vllm_config, self.settings, tp, pp)
                for pp in range(pc.pipeline_parallel_size)
                for tp in range(pc.tensor_parallel_size)
            ]
            self._scheduler = SchedulerSide(self.settings, spaces, block_size, logger)
            logger.info(
                "kvfs: connector on %s, chunks of %d tokens, model %s, weights %s, %s",
                self.settings.mount,
                spaces[0].chunk_size,
                spaces[0].model,
                dict(spaces[0].extra).get("weights", "as named"),
                f"sessions share the index {self._scheduler.index}"
                if self._scheduler.index
                else "sessions do not share (not a checked kvfs mount)",
            )
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            tp, pp = get_tp_group().rank_in_group, get_pp_group().rank_in_group
            space = vllm_key_space(vllm_config, self.settings, tp, pp)
            self._worker = WorkerSide(self.settings, space, logger)

    # -- worker side ------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def _plan(self) -> StepPlan:
        meta = self._connector_metadata
        return meta if isinstance(meta, StepPlan) else StepPlan()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load(self._plan(), forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs):
        assert self._worker is not None
        self._worker.save_layer(self._plan(), layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.submit_saves(self._plan())

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return self._worker.take_load_errors()

    def get_kv_connector_stats(self) -> KVFSStats | None:
        side = self._worker or self._scheduler
        data = side.stats.take() if side is not None else None
        return KVFSStats(data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVFSStats | None:
        return KVFSStats(data) if data is not None else KVFSStats()

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> KVFSPromMetrics:
        return KVFSPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def totals(self) -> dict[str, float]:
        """Counters since this connector started (for tools and tests)."""
        side = self._worker or self._scheduler
        return side.stats.totals() if side is not None else {}

    def flush(self) -> None:
        """Wait until every chunk handed to the writer is on the mount."""
        if self._worker is not None:
            self._worker.writer.flush()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # -- scheduler side ---------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind(lambda req_id: list(kv_cache_manager.get_block_ids(req_id)[0]))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(
            request.request_id, num_computed_tokens, lambda: prompt_info(request)
        )

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._scheduler.update_state_after_alloc(request.request_id, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        scheduled = scheduler_output.num_scheduled_tokens
        progress = {
            new.req_id: (new.num_computed_tokens, scheduled.get(new.req_id, 0))
            for new in scheduler_output.scheduled_new_reqs
        }
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, n in zip(cached.req_ids, cached.num_computed_tokens, strict=False):
            progress[req_id] = (n, scheduled.get(req_id, 0))
        plan = self._scheduler.build_plan(progress, scheduler_output.finished_req_ids or ())
        return KVFSConnectorMetadata(loads=plan.loads, saves=plan.saves, finished=plan.finished)

    def update_connector_output(self, connector_output) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output.invalid_block_ids)

    def request_finished(self, request: Request, block_ids: list[int]):
        assert self._scheduler is not None
        # Saves copy their blocks out during the step, so blocks can be freed now.
        return False, self._scheduler.request_finished(request.request_id)
