"""Every driver-side check of verl-cppo, run on the composed trainer config before Ray starts.

One protocol: every check takes the composed config and returns its ``Problem``s (``verl_cppo.launch.verl_checks``:
an error, a warning or a note); ``problems`` runs them all, and ``validate`` logs the warnings and raises ONE
``ValueError`` listing every error. Two entry points run exactly this list: ``main_ppo`` (``install`` wraps
``verl.utils.config.validate_config`` through ``verl_cppo.hooks``, documented in patches/README.md, so
``validate`` runs first) and ``python -m verl_cppo.launch.dry_run``. The checks:

* ``select_cppo_classes``: a ``policy_loss`` node holding ``cppo`` (an ``algorithm`` node holding
  ``cppo_grpo``) whose ``_target_`` is still verl's stock class is pointed at ``CPPOPolicyLossConfig``
  (``CPPOAlgoConfig``), so that one ``+...cppo.<key>=<value>`` override per setting is enough;
* ``_settings_nodes``: a ``cppo`` / ``cppo_grpo`` node whose selector picks another method (``loss_mode`` left
  at vanilla, or mistyped ``CPPO``) or whose ``_target_`` is a foreign class would have every setting dropped:
  refused, naming the selector and the keys set. Nodes are read through ``verl_cppo.config_paths``;
* ``_anchoring``: ``loss_mode=cppo`` must see the rollout policy, see below;
* ``verl_cppo.launch.unread_settings``: verl settings that cppo / cppo_grpo do not read (one table), set by the
  user, are refused naming the key to use instead (a silent no-op otherwise);
* ``check_topk_config``: a Top-K divergence the launch can serve;
* ``_cppo_grpo``: the estimator's node is valid and a group holds more than one response;
* ``verl_cppo.launch.verl_checks``: the workers' configs, the names verl looks up late, the GPU layout;
* ``_verl_assumptions`` (first): every assumption the plugin makes about verl's internals holds
  (``verl_cppo.hooks.assumptions``: its registrations are its own, verl's config classes lack its nodes, the
  batch carries its columns, each hooked function has the parameters it relies on).

Then ``verl_cppo.topk.setup.propagate_topk`` exports K to every Ray process when a Top-K divergence is set.

Anchoring (``_anchoring``; README's *Anchoring* table). CPPO measures divergence from the rollout policy mu;
verl 0.9.1 hands the loss mu as ``old_log_prob`` under ``algorithm.rollout_correction.bypass_mode=True``, under
either trainer (``verl_cppo.trainer.bypass_anchor`` keeps ``loss_mode=cppo`` on the legacy one). Bypass off makes
``old_log_prob`` the actor's recomputed pi_old (a known collapse mode, DPPO paper section 5.2): a prominent
warning, so that ``loss_mode=cppo`` alone still runs, and an error with a Top-K divergence or
``VERL_CPPO_STRICT_ANCHOR=1``. Errors: bypass without ``rollout.calculate_log_probs``, torchtitan / automodel with
context parallelism (shard-local rows, on which a row's prefix sum is not the response's). A Top-K divergence runs
under either trainer (mu's top-K travels the v1 TransferQueue record or the legacy trainer's DataProto batch,
``verl_cppo.topk.rollout``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, open_dict
from omegaconf.errors import MissingMandatoryValue

from verl_cppo import hooks
from verl_cppo.config import CPPO_ALGO_TARGET, CPPO_POLICY_LOSS_TARGET
from verl_cppo.config_paths import (
    ALGORITHM,
    CPPO_NODE,
    POLICY_LOSS,
    config_node,
    config_value,
    configured_topk,
    uses_the_plugin,
)
from verl_cppo.hooks import assumptions
from verl_cppo.launch.unread_settings import ignored_rollout_correction, ignored_settings
from verl_cppo.launch.verl_checks import Problem, launch_layout, registered_names, worker_configs
from verl_cppo.topk.rollout import ENV_TOPK, TOPK_ROLLOUTS
from verl_cppo.topk.setup import VLLM_DEFAULT_MAX_LOGPROBS, export_to_ray_job, propagate_topk

__all__ = [
    "STRICT_ANCHOR_ENV",
    "Problem",
    "check_topk_config",
    "install",
    "problems",
    "validate",
]

logger = logging.getLogger(__name__)

STRICT_ANCHOR_ENV = "VERL_CPPO_STRICT_ANCHOR"

_SETTINGS_NODES = (
    # (node, its settings key, the selector key, the value that selects it, verl's stock class, ours)
    (POLICY_LOSS, "cppo", "loss_mode", "cppo", "verl.workers.config.PolicyLossConfig", CPPO_POLICY_LOSS_TARGET),
    (ALGORITHM, "cppo_grpo", "adv_estimator", "cppo_grpo", "verl.trainer.config.AlgoConfig", CPPO_ALGO_TARGET),
)


def select_cppo_classes(config: Any) -> list[Problem]:
    """Point a node holding verl-cppo settings at verl-cppo's config class when it names verl's stock class.

    verl's own losses need one override per setting; without this, every ``cppo.*`` setting needed a second
    one (``_target_``). The composed config is changed in place before verl instantiates it (main_ppo passes
    the same object to Ray)."""
    notes = []
    for node_key, settings, _, _, stock, ours in _SETTINGS_NODES:
        node = config_node(config, node_key)
        if settings in node and node.get("_target_", stock) in (stock, None, ""):
            if isinstance(node, DictConfig):
                with open_dict(node):
                    node["_target_"] = ours
            else:
                node["_target_"] = ours
            notes.append(Problem(f"{node_key}._target_ set to {ours} (the node holds {settings} settings)", "note"))
    return notes


def _settings_nodes(config: Any) -> list[Problem]:
    """A settings node that would be dropped: its selector picks another method, or its class is foreign."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    registries = {"loss_mode": POLICY_LOSS_REGISTRY, "adv_estimator": ADV_ESTIMATOR_REGISTRY}
    found = []
    for node_key, settings, selector, value, _, ours in _SETTINGS_NODES:
        where = f"{node_key}.{settings}"
        keys = sorted(str(k) for k in config_node(config, where))  # refuses a scalar node, naming it
        chosen = config_value(config, f"{node_key}.{selector}")
        if keys and chosen != value and chosen in registries[selector]:  # unregistered: registered_names says so
            found.append(
                Problem(
                    f"{where} sets {keys} but {node_key}.{selector}={chosen!r}, so none of them would be used; set "
                    f"{node_key}.{selector}={value} (or remove the {settings} node)"
                )
            )
        target = config_node(config, node_key).get("_target_", "")
        if settings in config_node(config, node_key) and target != ours:
            found.append(
                Problem(
                    f"{where} is set but {node_key}._target_ is {target!r}, which has no {settings} field; set "
                    f"{node_key}._target_={ours} (or a subclass of it)"
                )
            )
    return found


def _shard_local_cp(actor: Any) -> int:
    """Context-parallel size of engines whose loss sees shard-local rows (no log-prob gather in 0.9.1)."""
    if config_value(actor, "strategy") not in ("torchtitan", "automodel"):
        return 1
    sizes = [
        child.get(key, 1) or 1
        for child in actor.values()
        if isinstance(child, Mapping)
        for key in ("context_parallel_size", "cp_size")
    ]
    return max(sizes, default=1)


def _anchoring(config: Any) -> list[Problem]:
    """loss_mode=cppo must measure against the rollout policy (see the module docstring)."""
    if config_node(config, POLICY_LOSS).get("loss_mode") != "cppo":
        return []
    found = []
    if not config_value(config, "algorithm.rollout_correction.bypass_mode", False):
        message = (
            "loss_mode=cppo measures divergence from the rollout policy, but "
            "algorithm.rollout_correction.bypass_mode=False makes old_log_prob the actor's recomputed pi_old; "
            "set algorithm.rollout_correction.bypass_mode=True"
        )
        if config_value(config, "actor_rollout_ref.actor.use_rollout_log_probs", False):
            message += " (actor.use_rollout_log_probs=True has no effect in verl 0.9.1)"
        if configured_topk(config):
            found.append(Problem(message + " (a Top-K divergence compares pi with the rollout policy's top-K)"))
        elif os.environ.get(STRICT_ANCHOR_ENV, "") == "1":
            found.append(Problem(message + f" (an error because {STRICT_ANCHOR_ENV}=1 is set)"))
        else:
            found.append(
                Problem(
                    message + f"; CPPO continues against pi_old ({STRICT_ANCHOR_ENV}=1 makes this an error)", "warning"
                )
            )
    elif not config_value(config, "actor_rollout_ref.rollout.calculate_log_probs", True):
        found.append(
            Problem(
                "bypass mode anchors CPPO on the rollout log-probs, but actor_rollout_ref.rollout.calculate_log_probs="
                "False; set it to True"
            )
        )
    cp = _shard_local_cp(config_value(config, "actor_rollout_ref.actor", {}) or {})
    if cp > 1:
        found.append(
            Problem(
                f"actor strategy {config_value(config, 'actor_rollout_ref.actor.strategy')!r} with context parallel "
                f"size {cp} "
                "gives the loss shard-local rows in verl 0.9.1; CPPO's prefix sums need whole responses"
            )
        )
    return found


def check_topk_config(config: Any) -> list[Problem]:
    """A Top-K divergence the launch cannot serve (nothing when none is configured)."""
    k = configured_topk(config)
    if k == 0:
        return []
    where = f"cppo.divergence={config_value(config, f'{CPPO_NODE}.divergence')}"
    errors = []  # bypass mode and the rollout log-probs: _anchoring (one key, one message)
    strategy = config_value(config, "actor_rollout_ref.actor.strategy")
    if strategy not in ("fsdp", "fsdp2", "megatron"):
        errors.append(f"{where} computes D in the FSDP and Megatron engines only; actor strategy={strategy!r}")
    rollout = config_value(config, "actor_rollout_ref.rollout.name")
    if rollout not in TOPK_ROLLOUTS:
        errors.append(
            f"{where} gets mu's top-K from verl's vllm or sglang server; actor_rollout_ref.rollout.name={rollout!r}"
        )
    key = "actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs"
    max_logprobs = config_value(config, key, None)
    max_logprobs = VLLM_DEFAULT_MAX_LOGPROBS if max_logprobs is None else max_logprobs
    if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) or max_logprobs < -1:
        errors.append(f"{key} must be an int (-1 = no limit), got {max_logprobs!r}")
    elif rollout == "vllm" and max_logprobs != -1 and k > max_logprobs:
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
        if config_value(config, key, False):
            errors.append(f"{where} does not support {key}=True ({reason}); set it to False")
    external = config_value(config, "actor_rollout_ref.model.external_lib", None) or []
    external = [external] if isinstance(external, str) else list(external)
    if "verl_cppo.megatron_shard_local" in external:
        errors.append(
            f"{where} needs the engine's gathered per-token outputs; the shard-local Megatron CP loss "
            "(actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_local) does not carry D: remove it"
        )
    preset = os.environ.get(ENV_TOPK)
    if preset and preset != str(k):
        errors.append(f"{ENV_TOPK}={preset} is set in the environment but cppo.topk={k}; unset it")
    return [Problem(e) for e in errors]


def _cppo_grpo(config: Any) -> list[Problem]:
    """A ``cppo_grpo`` group must hold more than one response."""
    algorithm = config_node(config, "algorithm")
    config_node(config, "algorithm.cppo_grpo")  # a scalar node: refused once, by the reader, not by Hydra again
    selected = algorithm.get("adv_estimator", None) == "cppo_grpo"
    found = []  # the node itself is built (and its values checked) by launch_checks.worker_configs
    n = config_value(config, "actor_rollout_ref.rollout.n", 1)
    if selected and isinstance(n, int) and n < 2:
        found.append(
            Problem(
                f"algorithm.adv_estimator=cppo_grpo with actor_rollout_ref.rollout.n={n}: every group holds one "
                "response, so every advantage is 0 (and cppo_grpo.exclude_zero_variance drops every group): nothing "
                "would train; set actor_rollout_ref.rollout.n >= 2 (the paper samples 8 or 16 per prompt)"
            )
        )
    return found


def _verl_assumptions(config: Any) -> list[Problem]:
    """What the plugin assumes of verl (``verl_cppo.hooks.assumptions``); a replaced registrant is a warning, and
    the opt-in that replaced it reaches every Ray process."""
    found = [Problem(message) for message in assumptions.violations(config)]
    for registry, other in assumptions.replaced_registrants().items():
        found.append(Problem(f"verl-cppo's {registry} replaced {other} ({assumptions.REPLACE_ENV}=1)", "warning"))
        export_to_ray_job(config, assumptions.REPLACE_ENV, "1")
    return found


CHECKS = (
    _verl_assumptions,
    _settings_nodes,
    _anchoring,
    ignored_settings,
    ignored_rollout_correction,
    check_topk_config,
    _cppo_grpo,
    worker_configs,
    launch_layout,
)
"""Every check of a composed config, in the order their problems are listed (``registered_names`` runs last:
it takes the working directory)."""


def problems(config: Any, working_dir: str | None = None, built: dict | None = None) -> list[Problem]:
    """Every problem of a composed trainer config (after ``select_cppo_classes``), each message once;
    ``built`` receives the workers' dataclass configs (``launch_checks.worker_configs``).

    A check that fails on an unexpected config shape becomes a warning naming it (the launch is not refused
    for a bug of the plugin's); a ``ValueError`` of the config reader (a scalar where a node belongs) is an
    error. A launch that does not involve verl-cppo (``uses_the_plugin``) gets warnings, never errors."""
    found = select_cppo_classes(config)
    checks = [functools.partial(worker_configs, built=built) if c is worker_configs else c for c in CHECKS]
    malformed = False
    for check in (*checks, functools.partial(registered_names, working_dir=working_dir)):
        name = getattr(check, "__name__", None) or check.func.__name__
        if malformed and name == "worker_configs":
            continue  # building a malformed node would report the same fault again, in Hydra's words
        try:
            found.extend(check(config))
        except MissingMandatoryValue as exc:  # verl's `???`: the launch would fail on it after Ray started
            found.append(Problem(f"{exc.full_key} must be set (verl's config has no default for it)"))
        except ValueError as exc:
            found.append(Problem(str(exc)))
            malformed = True
        except Exception as exc:
            found.append(Problem(f"verl-cppo check {name} could not run: {type(exc).__name__}: {exc}", "warning"))
    unique = list(dict.fromkeys(found))
    if uses_the_plugin(config) is None:
        # The entry point loads the plugin into every verl process: a plain verl launch keeps verl's own
        # behaviour, so what the plugin would refuse is only a warning there.
        unique = [
            Problem(f"{p.message} (not refused: this launch does not use verl-cppo)", "warning")
            if p.level == "error"
            else p
            for p in unique
        ]
    return unique


def validate(config: Any, working_dir: str | None = None) -> list[Problem]:
    """Every driver-side check; warnings logged prominently, notes at DEBUG, ONE ValueError listing every
    error. Then K of a Top-K divergence to every Ray process. Returns the problems (notes and warnings)."""
    found = problems(config, working_dir)
    for problem in found:
        if problem.level == "warning":
            logger.warning("\n%s\nverl-cppo WARNING: %s\n%s", "!" * 100, problem.message, "!" * 100)
        elif problem.level == "note":
            logger.debug("verl-cppo: %s", problem.message)
    errors = [p.message for p in found if p.level == "error"]
    if errors:
        raise ValueError("verl-cppo configuration error(s):\n" + "\n".join(f"  - {e}" for e in errors))
    propagate_topk(config)
    return found


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
