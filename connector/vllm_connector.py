"""KVFSConnector: the vLLM V1 connector facade; the work is in scheduler.py and worker.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from .plan import StepPlan
from .scheduler import SchedulerSide
from .settings import Settings, vllm_key_space
from .stats import KVFSStats
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
                "kvfs: connector on %s, chunks of %d tokens, model %s",
                self.settings.mount,
                spaces[0].chunk_size,
                spaces[0].model,
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
        return side.stats.take() if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVFSStats | None:
        return KVFSStats(data) if data is not None else KVFSStats()

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

    # -- scheduler side ---------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind(kv_cache_manager)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        plan = self._scheduler.build_plan(scheduler_output)
        return KVFSConnectorMetadata(loads=plan.loads, saves=plan.saves, finished=plan.finished)

    def update_connector_output(self, connector_output) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output.invalid_block_ids)

    def request_finished(self, request: Request, block_ids: list[int]):
        assert self._scheduler is not None
        # Saves copy their blocks out during the step, so blocks can be freed now.
        return False, self._scheduler.request_finished(request)
