"""Turning the Top-K divergences on: one config key in the driver, the same K in every Ray process.

The user selects ``actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_tv`` (or ``topk_kl``) and may set
``cppo.topk`` (K, default 20). Everything else follows from that node:

1. driver (``verl.utils.config.validate_config``, wrapped by ``verl_cppo.launch.driver``): K is
   ``verl_cppo.config_paths.configured_topk``; the driver's ``check_topk_config`` refuses configurations
   the Top-K path cannot serve, then ``propagate_topk`` exports VERL_CPPO_TOPK=K to the driver's environment
   and to ``ray_kwargs.ray_init.runtime_env.env_vars``, the Ray job's runtime environment that verl's
   ``run_ppo`` passes to ``ray.init``, so every process of the job (TaskRunner, agent-loop workers, rollout
   servers, actor workers) starts with it;
2. each process (``verl_cppo.plugin``, during ``import verl``): ``install_topk_runtime`` applies the Top-K diffs
   of ``verl_cppo/hooks/import_time_diffs`` to the verl modules when they are imported, wraps vLLM's
   ``LogprobsProcessor.from_new_request`` (``verl_cppo.topk.vllm_arrays``) and the legacy trainer's DataProto
   agent loop (``LEGACY_TRAJECTORY_HOOK``, ``LEGACY_BATCH_HOOK``), only when VERL_CPPO_TOPK is set.

The rollouts that serve mu's top-K are ``verl_cppo.topk.rollout.TOPK_ROLLOUTS`` (verl's vllm and sglang
servers with the diffs).

Nothing is patched, and nothing changes in verl, unless a Top-K divergence is configured.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from verl_cppo import hooks
from verl_cppo.config_paths import configured_topk
from verl_cppo.topk.rollout import ENV_TOPK, TOPK_ROLLOUTS, padded_topk_postprocess, rollout_topk, topk_into_batch

__all__ = [
    "AGENT_LOOP",
    "ENV_TOPK",
    "LEGACY_BATCH_HOOK",
    "LEGACY_TRAJECTORY_HOOK",
    "TOPK_DIFFS",
    "TOPK_ROLLOUTS",
    "VLLM_ARRAYS_HOOK",
    "export_to_ray_job",
    "install_topk_runtime",
    "propagate_topk",
    "vllm_arrays_wrapper",
]

logger = logging.getLogger(__name__)

TOPK_DIFFS = ["topk_rollout_servers.diff", "topk_agent_loop.diff", "topk_actor_update.diff"]
"""Diffs against verl 0.9.1 applied at import time when VERL_CPPO_TOPK is set (patches/README.md)."""

VLLM_DEFAULT_MAX_LOGPROBS = 20
"""vLLM's ModelConfig.max_logprobs default: a request for more top log-probs is rejected."""


def export_to_ray_job(config: Any, name: str, value: str) -> None:
    """Set environment variable ``name`` in this process and in ``ray_kwargs.ray_init.runtime_env.env_vars``,
    the Ray job's runtime environment that verl's ``run_ppo`` passes to ``ray.init``: every process of the job
    (TaskRunner, agent-loop workers, rollout servers, actor workers) starts with it."""
    from omegaconf import OmegaConf

    os.environ[name] = value
    keys = ["ray_kwargs", "ray_init", "runtime_env", "env_vars"]
    for depth in range(1, len(keys) + 1):  # a null node on the way (e.g. runtime_env: null) becomes {}
        node = ".".join(keys[:depth])
        if OmegaConf.select(config, node) is None:
            OmegaConf.update(config, node, {}, force_add=True)
    OmegaConf.update(config, f"{node}.{name}", value, force_add=True)


def propagate_topk(config: Any) -> int:
    """Export VERL_CPPO_TOPK=K to this process and to the Ray job's runtime env. Without Top-K, a VERL_CPPO_TOPK
    left in this process (a shell, or an earlier launch from the same Python process) is removed: Ray workers
    inherit the driver's environment and would patch a binary launch's rollout and actor for Top-K."""
    k = configured_topk(config)
    if k == 0:
        stale = os.environ.pop(ENV_TOPK, None)
        if stale is not None:
            logger.warning(
                "verl-cppo: %s=%s removed from the environment: this launch has no Top-K divergence", ENV_TOPK, stale
            )
        return 0
    export_to_ray_job(config, ENV_TOPK, str(k))
    logger.info("verl-cppo: Top-K divergence with K=%d; %s=%d exported to the Ray job's runtime env", k, ENV_TOPK, k)
    return k


AGENT_LOOP = "verl.experimental.agent_loop.agent_loop"

LEGACY_TRAJECTORY_HOOK = "topk_legacy_trajectory"
"""Hook name of the ``AgentLoopWorker._agent_loop_postprocess`` wrapper (legacy trainer, ``trainer.use_v1=False``):
each trajectory's top-K rows padded to the response length (``verl_cppo.topk.rollout.padded_topk_postprocess``).
``AgentLoopWorkerTQ`` (v1) overrides the method: its record gets the fields through ``topk_agent_loop.diff``."""

LEGACY_BATCH_HOOK = "topk_legacy_batch"
"""Hook name of the ``AgentLoopWorker._postprocess`` wrapper (legacy trainer): the trajectories' rows into the
``DataProto`` batch as ``[B, response_length, K]`` (``verl_cppo.topk.rollout.topk_into_batch``)."""

VLLM_ARRAYS_HOOK = "topk_vllm_arrays"
"""Hook name of the ``LogprobsProcessor.from_new_request`` wrapper (``verl_cppo.topk.vllm_arrays``)."""


def vllm_arrays_wrapper(original):
    """The ``hooks.wrap`` wrapper of vLLM's ``LogprobsProcessor.from_new_request`` that keeps mu's top-K as arrays
    (``verl_cppo.topk.vllm_arrays``, imported only when vLLM's frontend is)."""
    from verl_cppo.topk.vllm_arrays import wrap_from_new_request

    return wrap_from_new_request(original)


def install_topk_runtime() -> list[str]:
    """In a process with VERL_CPPO_TOPK set, patch the Top-K modules on import; returns their names.

    Also wraps vLLM's ``LogprobsProcessor.from_new_request`` (when vLLM's frontend is imported) so that the Top-K
    requests of verl's vLLM server keep mu's top-K as arrays (``verl_cppo.topk.vllm_arrays``)."""
    if not rollout_topk():
        return []
    hooks.wrap(
        "vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request", vllm_arrays_wrapper, name=VLLM_ARRAYS_HOOK
    )
    hooks.wrap(
        AGENT_LOOP, "AgentLoopWorker._agent_loop_postprocess", padded_topk_postprocess, name=LEGACY_TRAJECTORY_HOOK
    )
    hooks.wrap(AGENT_LOOP, "AgentLoopWorker._postprocess", topk_into_batch, name=LEGACY_BATCH_HOOK)
    return hooks.apply_diffs(TOPK_DIFFS)
