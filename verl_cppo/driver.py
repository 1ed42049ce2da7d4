"""Every driver-side check of verl-cppo, run on the composed trainer config before Ray starts.

verl's driver calls ``verl.utils.config.validate_config`` before it starts Ray; ``install`` wraps it (through
``verl_cppo.hooks``, documented in patches/README.md) so that ``validate`` runs first and stops the launch
with one ``ValueError`` listing every problem. Four groups of checks:

* configured but unselected (``_unselected_node``): a ``policy_loss.cppo`` node with ``loss_mode`` other than
  ``cppo`` (left at vanilla, or mistyped ``CPPO``), or an ``algorithm.cppo_grpo`` node with another
  ``adv_estimator``, would have every setting dropped while another method trains: refused, naming the
  selector's value and the keys set. Every node is read through ``verl_cppo.config.config_node``, which
  refuses a scalar where a node belongs (``+...policy_loss.cppo=0.2``), naming the key and the value;
* anchoring (``check_cppo_config``): ``loss_mode=cppo`` must see the rollout policy, see below; and verl's
  ratio-clip keys, which CPPO does not read, must stay at verl's defaults (``_ignored_clip_settings``);
* Top-K divergences (``check_topk_config``): the launch can serve mu's top-K and pi's logits;
* the ``cppo_grpo`` estimator (``check_cppo_grpo_config``): its node is instantiable and valid, and a group
  holds more than one response (``rollout.n >= 2``).

Then ``verl_cppo.topk.setup.propagate_topk`` exports K to every Ray process when a Top-K divergence is set.

Anchoring. CPPO measures divergence from the rollout policy mu, and verl 0.9.1 hands the loss mu as
``old_log_prob`` when ``algorithm.rollout_correction.bypass_mode=True``, under either trainer (under the legacy
one, ``trainer.use_v1=False``, with ``verl_cppo.bypass_anchor`` keeping ``loss_mode=cppo``). Otherwise:

* bypass off (any trainer): ``old_log_prob`` is pi_old recomputed by the actor, so CPPO silently measures
  against the wrong policy (a known collapse mode, DPPO paper section 5.2);
* a Top-K divergence with ``trainer.use_v1=False`` (``check_legacy_trainer``): mu's top-K travels only the v1
  path;
* bypass on without ``rollout.calculate_log_probs``: there are no rollout log-probs to anchor on;
* ``actor.use_rollout_log_probs=True`` is read by nothing in verl 0.9.1, so it does not anchor on mu;
* torchtitan / automodel with context parallelism hand the loss shard-local rows, on which a prefix
  sum over the row is not the response's prefix sum.

The first case is a prominent warning, because ``loss_mode=cppo`` alone (verl's default bypass_mode=False)
must still run: CPPO then anchors on pi_old, which equals mu up to the trainer/inference mismatch on the first
mini-batch and drifts from it afterwards. ``VERL_CPPO_STRICT_ANCHOR=1`` makes it an error (our examples and
CI set bypass mode, so they never see it). Every other case is an error (``ValueError`` before Ray starts):
CPPO would not run at all, or would compute garbage. verl has no hook for whole-config checks, so
``install`` wraps ``verl.utils.config.validate_config``; it runs in the driver when the plugin is loaded there
(the ``verl.plugins`` entry point, the default, or VERL_USE_EXTERNAL_MODULES).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from verl_cppo import hooks
from verl_cppo.config import CPPO_ALGO_TARGET, CPPO_POLICY_LOSS_TARGET, config_node, config_value
from verl_cppo.topk.rollout import ENV_TOPK, TOPK_ROLLOUTS
from verl_cppo.topk.setup import VLLM_DEFAULT_MAX_LOGPROBS, configured_topk, propagate_topk

__all__ = [
    "STRICT_ANCHOR_ENV",
    "check_cppo_config",
    "check_cppo_grpo_config",
    "check_legacy_trainer",
    "check_topk_config",
    "install",
    "validate",
    "validate_cppo_config",
]

logger = logging.getLogger(__name__)

STRICT_ANCHOR_ENV = "VERL_CPPO_STRICT_ANCHOR"
CPPO_TARGET = CPPO_POLICY_LOSS_TARGET
_get = config_value


def _shard_local_cp(actor: Any) -> int:
    """Context-parallel size of engines whose loss sees shard-local rows (no log-prob gather in 0.9.1)."""
    if _get(actor, "strategy") not in ("torchtitan", "automodel"):
        return 1
    sizes = [
        child.get(key, 1) or 1
        for child in actor.values()
        if isinstance(child, Mapping)
        for key in ("context_parallel_size", "cp_size")
    ]
    return max(sizes, default=1)


def check_cppo_config(config: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a composed verl trainer config (DictConfig or nested dicts)."""
    errors: list[str] = []
    warnings: list[str] = []
    policy_loss = config_node(config, "actor_rollout_ref.actor.policy_loss")
    target = policy_loss.get("_target_", "")
    if "cppo" in policy_loss and target != CPPO_TARGET:
        errors.append(
            "actor_rollout_ref.actor.policy_loss.cppo is set but the node's _target_ is "
            f"{target!r}; add actor_rollout_ref.actor.policy_loss._target_={CPPO_TARGET}"
        )
    unselected = _unselected_node(
        config, "actor_rollout_ref.actor.policy_loss.cppo", "actor_rollout_ref.actor.policy_loss.loss_mode", "cppo"
    )
    if unselected:
        errors.append(unselected)
    if policy_loss.get("loss_mode") != "cppo":
        return errors, warnings

    bypass = bool(_get(config, "algorithm.rollout_correction.bypass_mode", False))
    if not bypass:
        message = (
            "loss_mode=cppo measures divergence from the rollout policy, but "
            "algorithm.rollout_correction.bypass_mode=False makes old_log_prob the actor's recomputed pi_old; "
            "set algorithm.rollout_correction.bypass_mode=True"
        )
        if _get(config, "actor_rollout_ref.actor.use_rollout_log_probs", False):
            message += " (actor.use_rollout_log_probs=True has no effect in verl 0.9.1)"
        if os.environ.get(STRICT_ANCHOR_ENV, "") == "1":
            errors.append(message + f" ({STRICT_ANCHOR_ENV}=1)")
        else:
            warnings.append(message + f"; CPPO continues against pi_old ({STRICT_ANCHOR_ENV}=1 makes this an error)")
    if bypass and not _get(config, "actor_rollout_ref.rollout.calculate_log_probs", True):
        errors.append(
            "bypass mode anchors CPPO on the rollout log-probs, but actor_rollout_ref.rollout.calculate_log_probs="
            "False; set it to True"
        )
    cp = _shard_local_cp(_get(config, "actor_rollout_ref.actor", {}) or {})
    if cp > 1:
        errors.append(
            f"actor strategy {_get(config, 'actor_rollout_ref.actor.strategy')!r} with context parallel size {cp} "
            "gives the loss shard-local rows in verl 0.9.1; CPPO's prefix sums need whole responses"
        )
    errors.extend(_ignored_clip_settings(config))
    errors.extend(check_topk_config(config))
    errors.extend(check_legacy_trainer(config))
    return errors, warnings


def check_legacy_trainer(config: Any) -> list[str]:
    """Errors for what verl's legacy trainer (``trainer.use_v1=False``) cannot serve CPPO with. Its bypass
    mode anchors CPPO on mu (``verl_cppo.bypass_anchor``) and ``cppo_grpo`` excludes groups there too; the
    Top-K divergences' data travels only the v1 path (TransferQueue agent loop, v1 actor update)."""
    if _get(config, "trainer.use_v1", True) or configured_topk(config) == 0:
        return []
    return [
        f"cppo.divergence={_get(config, 'actor_rollout_ref.actor.policy_loss.cppo.divergence')} with "
        "trainer.use_v1=False: mu's top-K reaches the loss only through the v1 trainer (the TransferQueue agent "
        "loop stores it, the v1 actor update asks the engine for pi's logits); the legacy trainer's DataProto "
        "agent loop and actor update carry neither. Use trainer.use_v1=True or a binary divergence (binary_tv)"
    ]


_CLIP_KEYS = {
    "clip_ratio": "cppo.delta (the token threshold at t = 1)",
    "clip_ratio_low": "cppo.delta (the token threshold at t = 1)",
    "clip_ratio_high": "cppo.delta (the token threshold at t = 1)",
    "clip_ratio_c": "cppo.ratio_cap (the truncation of the detached ratio, default 20)",
}


def _ignored_clip_settings(config: Any) -> list[str]:
    """Errors for verl's ratio-clip keys set away from verl's defaults under loss_mode=cppo, which reads none of
    them: a user coming from the authors' port (clip_ratio=0.2, clip_ratio_c) would silently train at CPPO's
    defaults."""
    from verl.workers.config.actor import ActorConfig

    defaults = {f.name: f.default for f in fields(ActorConfig) if f.name in _CLIP_KEYS}
    actor = _get(config, "actor_rollout_ref.actor", {}) or {}
    errors = []
    for key, replacement in _CLIP_KEYS.items():
        value = actor.get(key, defaults[key])
        if value is not None and value != defaults[key]:
            errors.append(
                f"loss_mode=cppo does not read actor_rollout_ref.actor.{key} (set to {value!r}, verl's default is "
                f"{defaults[key]!r}); CPPO's setting is +actor_rollout_ref.actor.policy_loss.{replacement} with "
                f"actor_rollout_ref.actor.policy_loss._target_={CPPO_TARGET}: move the value there or drop {key}"
            )
    return errors


def _unselected_node(config: Any, node: str, selector: str, value: str) -> str | None:
    """An error when the settings node ``node`` is configured but ``selector`` does not select ``value``:
    every one of its settings would be dropped without a word (``loss_mode`` left at vanilla or mistyped)."""
    keys = sorted(str(k) for k in config_node(config, node))  # refuses a scalar node, naming it
    chosen = _get(config, selector)
    if not keys or chosen == value:
        return None
    return (
        f"{node} sets {keys} but {selector}={chosen!r}, so none of them would be used; set {selector}={value} "
        f"(or remove the {node.rpartition('.')[2]} node)"
    )


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
    if rollout not in TOPK_ROLLOUTS:
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


def check_cppo_grpo_config(config: Any) -> None:
    """Driver-side check of a composed trainer config: refuse a ``cppo_grpo`` node that verl's AlgoConfig
    could not hold, and instantiate the node (validating every setting) when the estimator is selected."""
    algorithm = config_node(config, "algorithm")
    selected = algorithm.get("adv_estimator", None) == "cppo_grpo"
    has_node = "cppo_grpo" in algorithm
    unselected = _unselected_node(config, "algorithm.cppo_grpo", "algorithm.adv_estimator", "cppo_grpo")
    if unselected:
        raise ValueError(unselected)
    if not (selected or has_node):
        return
    target = algorithm.get("_target_", "")
    if has_node and target != CPPO_ALGO_TARGET:
        raise ValueError(
            f"algorithm.cppo_grpo is set but algorithm._target_ is {target!r}; "
            f"add algorithm._target_={CPPO_ALGO_TARGET}"
        )
    if target == CPPO_ALGO_TARGET:
        from verl.utils.config import omega_conf_to_dataclass

        omega_conf_to_dataclass(algorithm)  # raises naming the key and its allowed range
    n = _get(config, "actor_rollout_ref.rollout.n", 1)
    if selected and isinstance(n, int) and n < 2:
        raise ValueError(
            f"algorithm.adv_estimator=cppo_grpo with actor_rollout_ref.rollout.n={n}: every group holds one "
            "response, so every advantage is 0 (and cppo_grpo.exclude_zero_variance drops every group): nothing "
            "would train; set actor_rollout_ref.rollout.n >= 2 (the paper samples 8 or 16 per prompt)"
        )


def validate_cppo_config(config: Any) -> None:
    """Raise ValueError listing every problem of check_cppo_config; log its warnings prominently."""
    errors, warnings = check_cppo_config(config)
    for message in warnings:
        logger.warning("\n%s\nverl-cppo WARNING: %s\n%s", "!" * 100, message, "!" * 100)
    if errors:
        raise ValueError("verl-cppo configuration error(s):\n" + "\n".join(f"  - {e}" for e in errors))


def validate(config: Any) -> None:
    """Every driver-side check of a composed trainer config, then K of a Top-K divergence to every Ray process."""
    validate_cppo_config(config)
    check_cppo_grpo_config(config)
    propagate_topk(config)


def _wrap_validate_config(original):
    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        validate(config)
        return original(config, *args, **kwargs)

    return validate_config


def install() -> None:
    """Run ``validate`` before verl's own ``validate_config`` in this process (idempotent)."""
    hooks.wrap(
        "verl.utils.config",
        "validate_config",
        _wrap_validate_config,
        name="driver_check",
        aliases=("verl.utils",),
        now=True,
    )
