"""Turning the Top-K divergences on: one config key in the driver, the same K in every Ray process.

The user selects ``actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_tv`` (or ``topk_kl``) and may set
``cppo.topk`` (K, default 20). Everything else follows from that node:

1. driver (``verl.utils.config.validate_config``, wrapped by ``verl_cppo.anchoring``): ``check_topk_config``
   refuses configurations the Top-K path cannot serve, then ``propagate_topk`` exports VERL_CPPO_TOPK=K to
   the driver's environment and to ``ray_kwargs.ray_init.runtime_env.env_vars``, the Ray job's runtime
   environment that verl's ``run_ppo`` passes to ``ray.init``, so every process of the job (TaskRunner,
   agent-loop workers, rollout servers, actor workers) starts with it;
2. each process (``verl_cppo.plugin``, during ``import verl``): ``install_topk_runtime`` applies the Top-K diffs
   of ``verl_cppo/patches`` to the verl modules when they are imported, only when VERL_CPPO_TOPK is set.

Nothing is patched, and nothing changes in verl, unless a Top-K divergence is configured.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from verl_cppo.anchoring import _get
from verl_cppo.config import TOPK_DIVERGENCES
from verl_cppo.patching import install_patches
from verl_cppo.rollout_topk import ENV_TOPK, rollout_topk

__all__ = ["TOPK_DIFFS", "check_topk_config", "configured_topk", "install_topk_runtime", "propagate_topk"]

logger = logging.getLogger(__name__)

TOPK_DIFFS = ["topk_rollout_servers.diff", "topk_agent_loop.diff", "topk_actor_update.diff"]
"""Diffs against verl 0.9.1 applied at import time when VERL_CPPO_TOPK is set (patches/README.md)."""

VLLM_DEFAULT_MAX_LOGPROBS = 20
"""vLLM's ModelConfig.max_logprobs default: a request for more top log-probs is rejected."""


def configured_topk(config: Any) -> int:
    """K when the composed trainer config selects a Top-K divergence of the cppo loss, else 0."""
    policy_loss = _get(config, "actor_rollout_ref.actor.policy_loss", {}) or {}
    if policy_loss.get("loss_mode") != "cppo":
        return 0
    cppo = policy_loss.get("cppo", None) or {}
    if cppo.get("divergence", "binary_tv") not in TOPK_DIVERGENCES:
        return 0
    k = cppo.get("topk", 20)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"cppo.topk must be an int >= 1, got {k!r}")
    return k


def check_topk_config(config: Any) -> list[str]:
    """Errors for a Top-K divergence the launch cannot serve (empty when none is configured)."""
    k = configured_topk(config)
    if k == 0:
        return []
    where = f"cppo.divergence={_get(config, 'actor_rollout_ref.actor.policy_loss.cppo.divergence')}"
    errors = []
    if not _get(config, "algorithm.rollout_correction.bypass_mode", False):
        errors.append(
            f"{where} compares pi with the rollout policy's top-K, so the loss must anchor on the rollout policy "
            "too: set algorithm.rollout_correction.bypass_mode=True"
        )
    if not _get(config, "actor_rollout_ref.rollout.calculate_log_probs", True):
        errors.append(f"{where} needs the rollout log-probs: set actor_rollout_ref.rollout.calculate_log_probs=True")
    strategy = _get(config, "actor_rollout_ref.actor.strategy")
    if strategy not in ("fsdp", "fsdp2", "megatron"):
        errors.append(f"{where} computes D in the FSDP and Megatron engines only; actor strategy={strategy!r}")
    rollout = _get(config, "actor_rollout_ref.rollout.name")
    if rollout not in ("vllm", "sglang") and not _cpu_test_rollout(rollout):
        errors.append(
            f"{where} gets mu's top-K from verl's vllm or sglang server; actor_rollout_ref.rollout.name={rollout!r}"
        )
    max_logprobs = _get(config, "actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs", None)
    max_logprobs = VLLM_DEFAULT_MAX_LOGPROBS if max_logprobs is None else int(max_logprobs)
    if rollout == "vllm" and max_logprobs != -1 and k > max_logprobs:
        errors.append(
            f"cppo.topk={k} but vLLM returns at most max_logprobs={max_logprobs} log-probs per token: set "
            f"+actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs={k}"
        )
    refused = {
        "actor_rollout_ref.model.use_fused_kernels": "the fused kernels never materialise the logits",
        "actor_rollout_ref.actor.pad_to_length": "its static padding is not applied to the per-token inputs",
        "actor_rollout_ref.actor.megatron.pad_to_length": "its static padding is not applied to the inputs",
        "actor_rollout_ref.actor.megatron.dynamic_context_parallel": "its CP groups are not known to the hook",
        "distillation.enabled": "top-K distillation uses the same engine hook",
    }
    for key, reason in refused.items():
        if _get(config, key, False):
            errors.append(f"{where} does not support {key}=True ({reason}); set it to False")
    external = _get(config, "actor_rollout_ref.model.external_lib", None) or []
    external = [external] if isinstance(external, str) else list(external)
    if "verl_cppo.megatron_shard_local" in external:
        errors.append(
            f"{where} needs the engine's gathered per-token outputs; the shard-local Megatron CP loss "
            "(actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_local) does not carry D: remove it"
        )
    preset = os.environ.get(ENV_TOPK)
    if preset and preset != str(k):
        errors.append(f"{ENV_TOPK}={preset} is set in the environment but cppo.topk={k}; unset it")
    return errors


def _cpu_test_rollout(rollout: Any) -> bool:
    """The CPU test rollout of ``verl_cppo.testing`` serves top-K too, under its explicit switch only."""
    from verl_cppo.testing import ROLLOUT_NAME, SWITCH_ENV

    return rollout == ROLLOUT_NAME and os.environ.get(SWITCH_ENV) == "1"


def propagate_topk(config: Any) -> int:
    """Export VERL_CPPO_TOPK=K to this process and to the Ray job's runtime env (no-op without Top-K)."""
    k = configured_topk(config)
    if k == 0:
        return 0
    from omegaconf import OmegaConf

    os.environ[ENV_TOPK] = str(k)
    keys = ["ray_kwargs", "ray_init", "runtime_env", "env_vars"]
    for depth in range(1, len(keys) + 1):  # a null node on the way (e.g. runtime_env: null) becomes {}
        node = ".".join(keys[:depth])
        if OmegaConf.select(config, node) is None:
            OmegaConf.update(config, node, {}, force_add=True)
    OmegaConf.update(config, f"{node}.{ENV_TOPK}", str(k), force_add=True)
    logger.info("verl-cppo: Top-K divergence with K=%d; %s=%d exported to the Ray job's runtime env", k, ENV_TOPK, k)
    return k


def install_topk_runtime() -> list[str]:
    """In a process with VERL_CPPO_TOPK set, patch the Top-K modules on import; returns their names."""
    if not rollout_topk():
        return []
    return install_patches(TOPK_DIFFS)
