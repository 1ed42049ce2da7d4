"""Dry run of a ``main_ppo`` launch (example script or your own): everything up to the first Ray call, on a CPU.

The ``run_*.sh`` scripts build their override list once and hand it either to ``python -m
verl.trainer.main_ppo`` or, with ``CPPO_DRY_RUN=1``, to this module (through the thin ``examples/dry_run.py``,
which checks the repository's copy of the plugin, the one ``ray job submit`` ships)::

    python -m verl_cppo.dry_run [--quiet] [--working-dir DIR] <hydra overrides...>

It is part of the installed package, so a user who installed the wheel without the repository checks their
own ``main_ppo`` command line by replacing ``python -m verl.trainer.main_ppo`` with ``python -m
verl_cppo.dry_run``.

It does, in order, what the launch would do before and just after Ray starts:

1. compose verl 0.9.1's ``ppo_trainer`` config from the overrides with Hydra, as ``@hydra.main`` does
   (a misspelled key, a missing ``+`` or a bad value type fails here);
2. run ``verl.utils.config.validate_config`` exactly as ``main_ppo.main`` calls it; verl-cppo wraps it with
   its anchoring check, so a CPPO run that would not measure against the rollout policy fails too
   (``VERL_CPPO_STRICT_ANCHOR=1`` is set, which turns the recomputed-anchor warning into an error);
3. instantiate the dataclass configs the workers build (``omega_conf_to_dataclass``): actor (policy loss and
   its ``cppo`` node included), rollout, algorithm, plus ref / critic when the run needs them, and
   the model config when ``actor_rollout_ref.model.path`` is a local directory;
4. resolve the names verl looks up only at run time: the policy loss and the advantage estimator in verl's
   registries (after the plugin registered its own), the rollout backend, the reward manager, the custom
   reward function and the checkpoint callback (built with its options);
5. check the launch layout that verl checks only on the GPUs: the GPU count against the model-parallel sizes,
   mini-batches that split evenly over data-parallel ranks, whole updates per rollout, a token budget that
   holds the longest sequence.

Exit status 0 means the launch gets past configuration; otherwise every problem found is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

import verl  # loads the verl.plugins entry point: verl_cppo registers itself
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

import verl_cppo  # noqa: F401  (explicit: also registers when the entry point is disabled)
from verl_cppo.driver import STRICT_ANCHOR_ENV

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: DictConfig | None = None
    """The composed config (None if composition failed)."""
    built: dict = field(default_factory=dict)
    """The instantiated dataclass configs by name (actor, rollout, algorithm, ...)."""

    def step(self, what: str, fn, *args):
        """Run one check; an exception becomes an error line naming the step."""
        try:
            return fn(*args)
        except Exception as exc:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return None


def compose_config(overrides: list[str]) -> DictConfig:
    """verl's trainer config exactly as ``python -m verl.trainer.main_ppo <overrides>`` composes it."""
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def validate(config: DictConfig) -> None:
    """main_ppo.main's checks, resolved at call time so that the plugin's wrapper is the one that runs."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils import config as verl_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    verl_config.validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )


def instantiate(config: DictConfig, report: Report) -> dict:
    """The dataclass configs the driver and the workers build from the composed config."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass

    arr = config.actor_rollout_ref
    built = {
        "actor": report.step("actor config", omega_conf_to_dataclass, arr.actor),
        "rollout": report.step("rollout config", omega_conf_to_dataclass, arr.rollout),
        "algorithm": report.step("algorithm config", omega_conf_to_dataclass, config.algorithm),
    }
    if need_reference_policy(config):
        ref = OmegaConf.create(OmegaConf.to_container(arr.ref, resolve=True))
        with open_dict(ref):  # the key renames of ActorRolloutRefWorker.init_model
            ref.ppo_mini_batch_size = arr.actor.ppo_mini_batch_size
            ref.ppo_micro_batch_size = ref.pop("log_prob_micro_batch_size", None)
            ref.ppo_micro_batch_size_per_gpu = ref.pop("log_prob_micro_batch_size_per_gpu", None)
            ref.use_dynamic_bsz = ref.pop("log_prob_use_dynamic_bsz", False)
            ref.ppo_max_token_len_per_gpu = ref.pop("log_prob_max_token_len_per_gpu", None)
        built["ref"] = report.step("ref config", omega_conf_to_dataclass, ref)
    if need_critic(config):
        built["critic"] = report.step("critic config", omega_conf_to_dataclass, config.critic)
    model_path = os.path.expanduser(str(arr.model.path))
    if os.path.isdir(model_path):
        built["model"] = report.step("model config", omega_conf_to_dataclass, arr.model)
    else:
        report.notes.append(f"model config not built: {arr.model.path!r} is not a local directory (Hub id?)")
    return built


def check_names(config: DictConfig, report: Report, working_dir: str | None = None) -> None:
    """Names verl resolves lazily (first training step, first reward): resolve them now.

    A relative ``reward.custom_reward_function.path`` is resolved against ``working_dir`` (default: the
    current directory), where the reward workers would run it (the repository under ``ray job submit
    --working-dir``)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

    loss_mode = config.actor_rollout_ref.actor.policy_loss.loss_mode
    if loss_mode not in POLICY_LOSS_REGISTRY:
        report.errors.append(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r} is not a registered policy loss; "
            f"registered: {sorted(POLICY_LOSS_REGISTRY)}"
        )
    estimator = config.algorithm.adv_estimator
    if estimator not in ADV_ESTIMATOR_REGISTRY:
        report.errors.append(
            f"algorithm.adv_estimator={estimator!r} is not a registered advantage estimator; "
            f"registered: {sorted(ADV_ESTIMATOR_REGISTRY)}"
        )
    rollout = config.actor_rollout_ref.rollout.name
    if rollout not in ("vllm", "sglang", "trtllm"):  # RolloutReplicaRegistry of verl 0.9.1
        report.errors.append(f"actor_rollout_ref.rollout.name={rollout!r} is not one of vllm, sglang, trtllm")
    report.step("reward.reward_manager", resolve_reward_manager_cls, config)
    path = config.reward.custom_reward_function.get("path")
    if path and not str(path).startswith("pkg://") and not os.path.isabs(path):
        # workers resolve a relative file path against their working directory: the repository under
        # `ray job submit --working-dir`; check it from there
        with open_dict(config):
            config.reward.custom_reward_function.path = os.path.join(working_dir or os.getcwd(), path)
    if path:
        fn = report.step("reward.custom_reward_function", get_custom_reward_fn, config)
        if fn is not None:
            report.notes.append(f"reward function: {path}:{config.reward.custom_reward_function.name}")
        with open_dict(config):
            config.reward.custom_reward_function.path = path
    if config.trainer.get("checkpoint_callback_class"):  # built by the trainer on the driver, after Ray started
        from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback

        if report.step("trainer.checkpoint_callback_class", build_checkpoint_callback, config) is not None:
            report.notes.append(f"checkpoint callback: {config.trainer.checkpoint_callback_class}")


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


def _engine_size_keys(actor: DictConfig) -> list[str]:
    if actor.strategy == "megatron":
        names = ["tensor_model", "pipeline_model", "context", "expert_model"]
        return [f"actor_rollout_ref.actor.megatron.{name}_parallel_size" for name in names]
    return ["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size"]


def check_layout(config: DictConfig, report: Report) -> None:
    """Divisibility and size checks verl makes only on the GPUs (or skips under dynamic batch sizes).

    Megatron: GPUs = DP x TP x PP x CP, and the expert layout EP x ETP must divide GPUs / PP (ETP defaults to
    TP). FSDP: GPUs = DP x Ulysses SP. A mini-batch (prompts x n responses) is split evenly over DP ranks, a
    rollout replica spans rollout TP x DP x PP GPUs, and one sequence must fit the per-GPU token budget times
    the sequence split (SP or CP), as verl's rearrange_micro_batches asserts.
    """
    trainer, data, arr = config.trainer, config.data, config.actor_rollout_ref
    actor, rollout, errors = arr.actor, arr.rollout, report.errors
    keys = [*LAYOUT_SIZES, *_engine_size_keys(actor)]
    values = {key: OmegaConf.select(config, key) for key in keys}
    bad = [f"{k}={v!r} must be a positive integer" for k, v in values.items() if not isinstance(v, int) or v < 1]
    if bad:
        errors.extend(bad)
        return
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
        (
            "rollout.log_prob_max_token_len_per_gpu",
            rollout.log_prob_use_dynamic_bsz,
            rollout.log_prob_max_token_len_per_gpu,
        ),
    ]
    for name, dynamic, budget in budgets:
        if dynamic and budget * seq_split < longest:
            errors.append(
                f"{name}={budget} x sequence split {seq_split} cannot hold one sequence of "
                f"max_prompt_length + max_response_length = {longest} tokens"
            )
    updates = batch // mini * actor.ppo_epochs if batch % mini == 0 else "not whole"
    report.notes.append(
        f"layout: {trainer.nnodes} node(s) x {trainer.n_gpus_per_node} GPUs = {n_gpus}; actor {engine}, "
        f"data-parallel {dp}; rollout TP={rollout.tensor_model_parallel_size}, {n_gpus // replica} replicas"
    )
    report.notes.append(
        f"batch: {batch} prompts x {n} responses per rollout, mini-batch {mini} prompts, "
        f"{updates} optimizer updates per rollout, responses up to {data.max_response_length} tokens"
    )


def describe_loss(built: dict, config: DictConfig, report: Report) -> None:
    actor = built.get("actor")
    if actor is None:
        return
    pl = actor.policy_loss
    text = f"policy loss: {pl.loss_mode}, {actor.loss_agg_mode} / loss_scale_factor={actor.loss_scale_factor}"
    if pl.loss_mode == "cppo":
        from verl_cppo.config import cppo_config_of

        text += f"; {cppo_config_of(actor)}"
    else:
        text += f"; clip_ratio_low={actor.clip_ratio_low} high={actor.clip_ratio_high} c={actor.clip_ratio_c}"
    report.notes.append(text)
    bypass = config.algorithm.rollout_correction.bypass_mode
    report.notes.append(
        f"anchor: bypass_mode={bypass}, trainer.use_v1={config.trainer.use_v1}, "
        f"adv_estimator={config.algorithm.adv_estimator}"
    )


def check_data_files(config: DictConfig, report: Report) -> None:
    for key in ("train_files", "val_files"):
        files = config.data[key]
        files = [files] if isinstance(files, str) else list(files)
        missing = [f for f in files if not os.path.exists(os.path.expanduser(str(f)))]
        if missing:
            report.notes.append(f"data.{key}: not on this machine (fine for CI; prepare them before a run): {missing}")


@contextlib.contextmanager
def _strict_anchor():
    """Make the plugin's recomputed-anchor warning an error for the duration of a dry run."""
    previous = os.environ.get(STRICT_ANCHOR_ENV)
    os.environ[STRICT_ANCHOR_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(STRICT_ANCHOR_ENV)
        else:
            os.environ[STRICT_ANCHOR_ENV] = previous


def dry_run(overrides: list[str], working_dir: str | None = None) -> Report:
    """All checks on one override list; the returned report lists every error found."""
    with _strict_anchor():
        return _dry_run(overrides, working_dir)


def _dry_run(overrides: list[str], working_dir: str | None = None) -> Report:
    report = Report()
    config = report.config = report.step("compose (Hydra)", compose_config, overrides)
    if config is None:
        return report
    report.step("validate_config", validate, config)
    built = report.built = instantiate(config, report)
    check_names(config, report, working_dir)
    report.step("launch layout", check_layout, config, report)
    describe_loss(built, config, report)
    check_data_files(config, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verl_cppo.dry_run",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m verl_cppo.dry_run actor_rollout_ref.actor.policy_loss.loss_mode=cppo "
        "algorithm.rollout_correction.bypass_mode=True actor_rollout_ref.model.path=Qwen/Qwen3-1.7B ... "
        "(the overrides of your main_ppo command). Exit status 0: the launch gets past configuration.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--working-dir",
        default=None,
        help="directory a relative reward.custom_reward_function.path is resolved against (default: the "
        "current directory; examples/dry_run.py passes the repository, the ray job's working dir)",
    )
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, as for main_ppo")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    overrides = [o for o in args.overrides if o != "--"]
    report = dry_run(overrides, args.working_dir)
    if not args.quiet:
        for note in report.notes:
            print(f"[dry-run] {note}")
    if report.errors:
        print(f"[dry-run] FAILED: {len(report.errors)} problem(s) in {len(overrides)} overrides:", file=sys.stderr)
        for error in report.errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print(f"[dry-run] OK: {len(overrides)} overrides compose, validate and instantiate against verl {verl.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
