"""Launch checks of a composed ``main_ppo`` config that are not about CPPO: what verl itself would refuse only
after Ray started (a worker's config, a name looked up at the first step, the GPU layout).

They used to be the dry run's alone, so ``main_ppo`` accepted what the dry run refused (``loss_mode=CPPO``,
an unimportable ``external_lib``, a reward whose dependency is missing). They are now part of the one list of
checks that ``verl_cppo.launch.driver.problems`` runs for both entry points (``main_ppo``'s ``validate_config`` and
``python -m verl_cppo.launch.dry_run``). Each check takes the composed config and returns its ``Problem``s:

* ``worker_configs``: the dataclass configs the workers build (rollout, algorithm, ref / critic when used,
  the model config when ``model.path`` is a local directory), built now (the actor's is built by verl's own
  ``validate_config`` right after these checks);
* ``registered_names``: the policy loss, the advantage estimator and the rollout backend in verl's registries
  (after every plugin registered), the reward manager, the custom reward function and what it imports on
  first use, each ``model.external_lib`` module, the checkpoint callback;
* ``launch_layout``: the GPU count against the model-parallel sizes, mini-batches that split evenly over
  data-parallel ranks, whole updates per rollout, a token budget that holds the longest sequence.

A ``note`` is information only (the dry run prints it, ``main_ppo`` logs it at DEBUG).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import OmegaConf, open_dict

from verl_cppo.config_paths import POLICY_LOSS
from verl_cppo.launch.data_check import missing_fields

__all__ = ["LAYOUT_SIZES", "Problem", "launch_layout", "registered_names", "worker_configs"]


@dataclass(frozen=True)
class Problem:
    """One finding of a driver-side check: an ``error`` stops the launch, a ``warning`` is logged
    prominently, a ``note`` describes the launch."""

    message: str
    level: Literal["error", "warning", "note"] = "error"


def _error(message: str) -> Problem:
    return Problem(message)


def _note(message: str) -> Problem:
    return Problem(message, "note")


def _attempt(what: str, fn, *args) -> tuple[Any, list[Problem]]:
    """``fn(*args)`` and no problem, or None and an error naming ``what`` and the exception."""
    try:
        return fn(*args), []
    except Exception as exc:  # any failure of verl's own constructors is the launch's failure
        return None, [_error(f"{what}: {type(exc).__name__}: {exc}")]


def worker_configs(config: Any, built: dict | None = None) -> list[Problem]:
    """Build the dataclass configs the driver's trainer and the workers build; ``built`` receives them."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass

    built = {} if built is None else built
    arr, problems = config.actor_rollout_ref, []
    nodes = {"rollout": arr.rollout, "algorithm": config.algorithm}
    if need_reference_policy(config):
        ref = OmegaConf.create(OmegaConf.to_container(arr.ref, resolve=True))
        with open_dict(ref):  # the key renames of ActorRolloutRefWorker.init_model
            ref.ppo_mini_batch_size = arr.actor.ppo_mini_batch_size
            ref.ppo_micro_batch_size = ref.pop("log_prob_micro_batch_size", None)
            ref.ppo_micro_batch_size_per_gpu = ref.pop("log_prob_micro_batch_size_per_gpu", None)
            ref.use_dynamic_bsz = ref.pop("log_prob_use_dynamic_bsz", False)
            ref.ppo_max_token_len_per_gpu = ref.pop("log_prob_max_token_len_per_gpu", None)
        nodes["ref"] = ref
    models = {"model": (arr.model, arr.model)}  # a model config (and the critic's) reads the model's files
    if need_critic(config):
        models["critic"] = (config.critic, config.critic.model)
    for name, (node, model) in models.items():
        if os.path.isdir(os.path.expanduser(str(model.path))):
            nodes[name] = node
        else:
            problems.append(_note(f"{name} config not built: {model.path!r} is not a local directory (Hub id?)"))
    for name, node in nodes.items():
        built[name], found = _attempt(f"{name} config", omega_conf_to_dataclass, node)
        problems.extend(found)
    return problems


def _unregistered(key: str, value: Any, registered) -> Problem:
    names = sorted(registered)
    close = difflib.get_close_matches(str(value).lower(), names, n=1) or [n for n in names if n == str(value).lower()]
    hint = f"; did you mean {key}={close[0]}?" if close else ""
    return _error(f"{key}={value!r} is not registered in verl; registered: {names}{hint}")


def _external_libs(config: Any) -> list[Problem]:
    libs = OmegaConf.select(config, "actor_rollout_ref.model.external_lib", default=None) or []
    libs = [libs] if isinstance(libs, str) else list(libs)
    problems = []
    for lib in libs:
        try:
            found = importlib.util.find_spec(str(lib)) is not None
        except (ImportError, ValueError):  # a missing parent package
            found = False
        if not found:
            problems.append(
                _error(
                    f"actor_rollout_ref.model.external_lib={lib!r}: no such module on this machine (every actor "
                    "worker imports it at start-up)"
                )
            )
    return problems


REWARD_NEEDS = {"verl_cppo.math_task.reward": ("math_verify", "pip install 'math-verify>=0.8' (verl's `math` extra)")}
"""Modules a shipped reward function imports only on its first call: checked before Ray starts."""


def _reward_function(config: Any, working_dir: str | None) -> list[Problem]:
    from verl.trainer.ppo.reward import get_custom_reward_fn

    node = config.reward.get("custom_reward_function") or {}
    path = node.get("path")
    if not path:
        return []
    key = "reward.custom_reward_function"
    if not str(path).startswith("pkg://") and not os.path.isabs(path):
        # reward workers resolve a relative file against their working directory: the driver's, or the
        # repository under `ray job submit --working-dir`
        with open_dict(config):
            config.reward.custom_reward_function.path = os.path.join(working_dir or os.getcwd(), path)
    try:
        fn, problems = _attempt(key, get_custom_reward_fn, config)
    finally:
        with open_dict(config):
            config.reward.custom_reward_function.path = path
    if fn is None:
        return problems
    problems = _reward_data(config, fn, key)
    module = str(path).removeprefix("pkg://")
    if module in REWARD_NEEDS:
        needed, install = REWARD_NEEDS[module]
        try:
            importlib.import_module(needed)
        except ImportError as exc:
            missing = f"{key}.path={path} needs {needed}, which does not import here ({exc}): {install}"
            return [*problems, _error(missing)]
    return [*problems, _note(f"reward function: {path}:{node.get('name')}")]


def _reward_data(config: Any, fn: Any, key: str) -> list[Problem]:
    """The data files hold what the loaded reward declares it reads from every row (its module's
    ``DATA_FIELDS``; ``verl_cppo.launch.data_check``)."""
    # verl 0.9.1's get_custom_reward_fn returns partial(_call_with_kwargs, <the loaded function>, kwargs)
    raw = fn.args[0] if isinstance(fn, functools.partial) and fn.args and callable(fn.args[0]) else None
    if raw is None:
        return [Problem(f"{key}: verl returned {fn!r}, not the expected partial; data fields not checked", "warning")]
    fields = getattr(raw, "__globals__", {}).get("DATA_FIELDS")
    if not fields:
        return []
    found = []
    for data_key in ("train_files", "val_files"):
        files = (config.get("data") or {}).get(data_key) or []
        files = [files] if isinstance(files, str) else list(files)
        errors, notes = missing_fields(files, fields, f"data.{data_key}")
        found += [Problem(e) for e in errors] + [_note(n) for n in notes]
    return found


def registered_names(config: Any, working_dir: str | None = None) -> list[Problem]:
    """Names verl resolves lazily (first training step, first reward, each worker's start): resolve them now.

    A relative ``reward.custom_reward_function.path`` is resolved against ``working_dir`` (default: the
    current directory, where ``main_ppo`` runs)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    problems = []
    loss_mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
    if loss_mode not in POLICY_LOSS_REGISTRY:
        problems.append(_unregistered(f"{POLICY_LOSS}.loss_mode", loss_mode, POLICY_LOSS_REGISTRY))
    estimator = config.algorithm.adv_estimator
    if estimator not in ADV_ESTIMATOR_REGISTRY:
        problems.append(_unregistered("algorithm.adv_estimator", estimator, ADV_ESTIMATOR_REGISTRY))
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    rollout = config.actor_rollout_ref.rollout.name
    if rollout not in RolloutReplicaRegistry._registry:
        problems.append(_unregistered("actor_rollout_ref.rollout.name", rollout, RolloutReplicaRegistry._registry))
    problems += _attempt("reward.reward_manager", resolve_reward_manager_cls, config)[1]
    problems += _reward_function(config, working_dir)
    problems += _external_libs(config)
    if config.trainer.get("checkpoint_callback_class"):  # built by the trainer on the driver, after Ray started
        from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback

        callback, found = _attempt("trainer.checkpoint_callback_class", build_checkpoint_callback, config)
        problems += found
        if callback is not None:
            problems.append(_note(f"checkpoint callback: {config.trainer.checkpoint_callback_class}"))
    return problems


LAYOUT_SIZES = [
    "trainer.n_gpus_per_node",
    "trainer.nnodes",
    "data.train_batch_size",
    "data.max_prompt_length",
    "data.max_response_length",
    "actor_rollout_ref.actor.ppo_mini_batch_size",
    "actor_rollout_ref.actor.ppo_epochs",
    "actor_rollout_ref.rollout.n",
    "actor_rollout_ref.rollout.tensor_model_parallel_size",
    "actor_rollout_ref.rollout.data_parallel_size",
    "actor_rollout_ref.rollout.pipeline_model_parallel_size",
]
"""Keys the layout arithmetic uses (plus the engine's parallel sizes); verl's YAML does not type them."""


def _engine_size_keys(actor: Any) -> list[str]:
    if actor.strategy == "megatron":
        names = ["tensor_model", "pipeline_model", "context", "expert_model"]
        return [f"actor_rollout_ref.actor.megatron.{name}_parallel_size" for name in names]
    return ["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size"]


def launch_layout(config: Any) -> list[Problem]:
    """Divisibility and size checks verl makes only on the GPUs (or skips under dynamic batch sizes).

    Megatron: GPUs = DP x TP x PP x CP, and the expert layout EP x ETP must divide GPUs / PP (ETP defaults to
    TP). FSDP: GPUs = DP x Ulysses SP. A mini-batch (prompts x n responses) is split evenly over DP ranks, a
    rollout replica spans rollout TP x DP x PP GPUs, and one sequence must fit the per-GPU token budget times
    the sequence split (SP or CP), as verl's rearrange_micro_batches asserts.
    """
    trainer, data, arr = config.trainer, config.data, config.actor_rollout_ref
    actor, rollout = arr.actor, arr.rollout
    if actor.strategy not in ("fsdp", "fsdp2", "megatron"):
        return [_note(f"launch layout not checked for actor strategy {actor.strategy!r}")]
    values = {key: OmegaConf.select(config, key) for key in [*LAYOUT_SIZES, *_engine_size_keys(actor)]}
    bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        return [_error(f"{k}={values[k]!r} must be a positive integer") for k in bad]
    errors = []
    n_gpus = trainer.n_gpus_per_node * trainer.nnodes
    if actor.strategy == "megatron":
        m = actor.megatron
        tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
        ep, etp = m.expert_model_parallel_size, m.expert_tensor_parallel_size or tp
        if n_gpus % (tp * pp * cp):
            errors.append(f"{n_gpus} GPUs are not divisible by Megatron TP x PP x CP = {tp * pp * cp}")
        if (n_gpus // pp) % (ep * etp):
            errors.append(f"{n_gpus} GPUs / PP={pp} are not divisible by Megatron EP x ETP = {ep * etp}")
        dp, seq_split, engine = n_gpus // (tp * pp * cp), cp, f"Megatron TP={tp} PP={pp} CP={cp} EP={ep} ETP={etp}"
    else:
        sp = max(actor.fsdp_config.ulysses_sequence_parallel_size, actor.get("ulysses_sequence_parallel_size", 1))
        if n_gpus % sp:
            errors.append(f"{n_gpus} GPUs are not divisible by the Ulysses SP size {sp}")
        dp, seq_split, engine = n_gpus // sp, sp, f"{actor.strategy.upper()} Ulysses SP={sp}"
    replica = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
    if n_gpus % replica:
        errors.append(f"{n_gpus} GPUs are not divisible by the rollout replica size TP x DP x PP = {replica}")
    n, batch, mini = rollout.n, data.train_batch_size, actor.ppo_mini_batch_size
    if batch % mini:
        errors.append(f"data.train_batch_size={batch} is not a multiple of actor.ppo_mini_batch_size={mini}")
    if dp > 0 and (mini * n) % dp:
        errors.append(f"a mini-batch of {mini} prompts x {n} responses does not split over {dp} data-parallel ranks")
    if actor.use_dynamic_bsz != rollout.log_prob_use_dynamic_bsz:
        errors.append("actor.use_dynamic_bsz and rollout.log_prob_use_dynamic_bsz must be equal (worker assertion)")
    longest = data.max_prompt_length + data.max_response_length
    budgets = [
        ("actor.ppo_max_token_len_per_gpu", actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu),
        ("rollout.log_prob_max_token_len_per_gpu", rollout.log_prob_use_dynamic_bsz,
         rollout.log_prob_max_token_len_per_gpu),
    ]  # fmt: skip
    for name, dynamic, budget in budgets:
        if dynamic and budget * seq_split < longest:
            errors.append(
                f"{name}={budget} x sequence split {seq_split} cannot hold one sequence of "
                f"max_prompt_length + max_response_length = {longest} tokens"
            )
    updates = batch // mini * actor.ppo_epochs if batch % mini == 0 else "not whole"
    return [
        *map(_error, errors),
        _note(
            f"layout: {trainer.nnodes} node(s) x {trainer.n_gpus_per_node} GPUs = {n_gpus}; actor {engine}, "
            f"data-parallel {dp}; rollout TP={rollout.tensor_model_parallel_size}, {n_gpus // replica} replicas"
        ),
        _note(
            f"batch: {batch} prompts x {n} responses per rollout, mini-batch {mini} prompts, "
            f"{updates} optimizer updates per rollout, responses up to {data.max_response_length} tokens"
        ),
    ]
