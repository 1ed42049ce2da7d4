"""What verl-cppo assumes about verl 0.9.1, read at load and checked by the driver before Ray starts.

The plugin reaches into verl in five ways. A newer verl can break each, some of them silently, so each is an
explicit, checked assumption rather than a hope:

1. **Registrations.** ``cppo`` (policy loss) and ``cppo_grpo`` (advantage estimator) are ours alone. verl's
   policy-loss registry keeps the last writer and its estimator registry refuses a second one, so a verl that
   registers its own ``cppo`` (the paper authors' port, verl PR #6731) would silently swap losses with us,
   depending on import order. ``registering_ours`` wraps the plugin's registration: a registrant found there
   from elsewhere keeps its name (ours is not installed over it) unless ``VERL_CPPO_REPLACE_REGISTERED=1``
   opts in, and the driver refuses a CPPO launch whose registry does not hold ours, naming the other one.
2. **Config nodes.** verl's own ``PolicyLossConfig`` / ``AlgoConfig`` have no ``cppo`` / ``cppo_grpo`` field:
   the driver points such a node at our config classes, which would capture verl's own node.
3. **Columns.** The batch container carries every column the plugin adds (``cppo_grpo_keep``, mu's top-K) to
   the workers that read it. verl 0.9.1's ``DataProto`` and ``TensorDict`` carry any key; ``NeoProto`` (verl's
   ``neo`` branch) materializes only the keys a worker declares, so excluded groups would silently train:
   refused when the launch's data plane is NeoProto (read from the config by verl's own rule).
4. **Signatures.** Every verl function the plugin wraps or calls by keyword has the parameters it relies on.
   They are read from verl's source (``ast``), not imported: the driver need not import the Megatron engine.
   A function of an optional feature (the shard-local Megatron loss, Top-K, the checkpoint callback) is
   checked only for a launch that uses it (``FEATURES``).
5. **Diffs.** Every import-time diff (``verl_cppo/hooks/import_time_diffs``, named ``<feature>_*.diff``) applies to
   the installed verl's source, for a launch that uses its feature: otherwise the first Ray process that imports
   a patched module would raise ``PatchError``, after Ray started.

``violations()`` returns one message per broken assumption, naming it, what was found, and the verl version
this package supports; the driver reports them (errors for a launch that uses the plugin, warnings for a
plain verl launch, which is never blocked). On verl 0.9.1 there are none (tests/hooks/test_assumptions.py).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from verl_cppo.config_paths import config_value
from verl_cppo.hooks.diffs import PATCH_DIR, PatchError, apply_diff, parse_diff

__all__ = [
    "FEATURES",
    "REPLACE_ENV",
    "SIGNATURES",
    "SUPPORTED_VERL",
    "Signature",
    "registering_ours",
    "replaced_registrants",
    "violations",
]

SUPPORTED_VERL = "0.9.1"
REPLACE_ENV = "VERL_CPPO_REPLACE_REGISTERED"
"""``1``: install our ``cppo`` / ``cppo_grpo`` over a registrant found from elsewhere (set it for every process;
the driver exports it to the Ray job's runtime environment)."""

_OURS = {"policy_loss": ("cppo", "verl_cppo."), "adv_estimator": ("cppo_grpo", "verl_cppo.")}
_FOREIGN: dict[str, str] = {}  # registry kind -> the registrant found before ours ("module.qualname")


@dataclass(frozen=True)
class Signature:
    """A verl (or vLLM) function the plugin wraps or calls by keyword, and the parameters it relies on."""

    module: str
    qualname: str  # "function" or "Class.method"; an imported name is accepted as bound
    params: tuple[str, ...]
    used_by: str
    feature: str = "always"  # checked only for a launch that uses it: see FEATURES


SIGNATURES = (
    Signature("verl.utils.config", "validate_config", ("config",), "the driver's checks (verl_cppo.launch.driver)"),
    Signature(
        "verl.trainer.ppo.rollout_corr_helper",
        "apply_bypass_mode",
        ("batch", "rollout_corr_config", "policy_loss_config"),
        "the legacy trainer's bypass anchor (verl_cppo.trainer.bypass_anchor)",
    ),
    Signature("verl.trainer.ppo.ray_trainer", "compute_advantage", ("data",), "cppo_grpo's exclusion (legacy)"),
    Signature(
        "verl.trainer.ppo.v1.trainer_base",
        "PPOTrainer._compute_advantage",
        ("self", "batch", "metrics"),
        "cppo_grpo's exclusion (v1 trainer)",
    ),
    Signature("verl.workers.engine_workers", "TrainingWorker.train_batch", ("self", "data"), "cppo_grpo's exclusion"),
    Signature("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._val_metrics_update", ("self",), "AIME averages"),
    Signature("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._val_metrics_update", ("self",), "AIME averages"),
    Signature(
        "verl.utils.tracking", "Tracking.log", ("self", "data", "step"), "the best-checkpoint callback", "checkpoints"
    ),
    Signature(
        "verl.workers.utils.losses",
        "ppo_loss",
        ("config", "model_output", "data", "dp_group"),
        "the loss call site (shard-local CP loss, Top-K engine hook)",
    ),
    Signature(
        "verl.trainer.ppo.core_algos",
        "agg_loss",
        ("loss_mat", "loss_mask", "loss_agg_mode", "dp_size", "batch_num_tokens", "global_batch_size"),
        "the cppo loss's aggregation (verl_cppo.loss)",
    ),
    Signature(
        "verl.workers.engine.megatron.transformer_impl",
        "MegatronEngine.forward_backward_batch",
        ("self", "data", "loss_function", "forward_only"),
        "the shard-local Megatron CP loss (verl_cppo.megatron_shard_local)",
        "shard_local",
    ),
    Signature(
        "verl.workers.engine.megatron.transformer_impl",
        "MegatronEngineWithLMHead.postprocess_micro_batch_func",
        ("self", "output", "data", "forward_only", "loss_function", "local_cp_size"),
        "the shard-local Megatron CP loss (verl_cppo.megatron_shard_local)",
        "shard_local",
    ),
    Signature(
        "verl.models.mcore.util",
        "postprocess_thd_engine",
        ("output", "packed_seq_params", "input_ids", "batch_size", "post_process", "local_cp_size", "cp_layout"),
        "the shard-local Megatron CP loss (verl_cppo.megatron_shard_local)",
        "shard_local",
    ),
    Signature("verl.models.mcore.model_forward", "postprocess_thd_engine", (), "the Megatron CP loss", "shard_local"),
    Signature(
        "verl.experimental.agent_loop.agent_loop",
        "AgentLoopWorker._agent_loop_postprocess",
        ("self", "output", "validate"),
        "mu's top-K into the legacy trainer's batch (verl_cppo.topk.rollout.padded_topk_postprocess)",
        "topk",
    ),
    Signature(
        "verl.experimental.agent_loop.agent_loop",
        "AgentLoopWorker._postprocess",
        ("self", "inputs"),
        "mu's top-K into the legacy trainer's batch (verl_cppo.topk.rollout.topk_into_batch)",
        "topk",
    ),
    Signature(
        "vllm.v1.engine.logprobs",
        "LogprobsProcessor.from_new_request",
        ("cls", "tokenizer", "request"),
        "mu's top-K from vLLM (verl_cppo.topk.vllm_arrays)",
        "topk",
    ),
)
"""Every signature assumption (tests/hooks/test_assumptions.py keeps it covering every ``hooks.wrap`` target)."""


FEATURES = {
    "always": lambda config: True,
    "shard_local": lambda config: (
        "verl_cppo.megatron_shard_local" in str(config_value(config, "actor_rollout_ref.model.external_lib") or "")
    ),
    "topk": lambda config: str(
        config_value(config, "actor_rollout_ref.actor.policy_loss.cppo.divergence") or ""
    ).startswith("topk"),
    "checkpoints": lambda config: "verl_cppo" in str(config_value(config, "trainer.checkpoint_callback_class") or ""),
}
"""Which launches use a feature whose signatures are checked (every feature when no config is given)."""


def _registrant(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@contextlib.contextmanager
def registering_ours() -> Iterator[None]:
    """Around the import of ``verl_cppo.loss`` and ``verl_cppo.advantage.estimator`` (which register ``cppo`` and
    ``cppo_grpo``): a registrant found from elsewhere is recorded, and kept unless ``REPLACE_ENV=1``."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    registries = {"policy_loss": POLICY_LOSS_REGISTRY, "adv_estimator": ADV_ESTIMATOR_REGISTRY}
    replace = os.environ.get(REPLACE_ENV, "") == "1"
    found = {}
    for kind, registry in registries.items():
        name, prefix = _OURS[kind]
        current = registry.get(name)
        if current is not None and not getattr(current, "__module__", "").startswith(prefix):
            found[kind] = current
            _FOREIGN[kind] = _registrant(current)
            del registry[name]  # verl's estimator registry refuses a second registrant; ours goes in, then out
    try:
        yield
    finally:
        if not replace:
            for kind, current in found.items():
                registries[kind][_OURS[kind][0]] = current


def replaced_registrants() -> dict[str, str]:
    """Registrants from elsewhere that ours replaced under ``REPLACE_ENV=1`` ({registry: "module.qualname"})."""
    return dict(_FOREIGN) if os.environ.get(REPLACE_ENV, "") == "1" else {}


def _registration_violations() -> list[str]:
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    found = []
    for kind, registry in (("policy_loss", POLICY_LOSS_REGISTRY), ("adv_estimator", ADV_ESTIMATOR_REGISTRY)):
        name, prefix = _OURS[kind]
        current = registry.get(name)
        if current is None or getattr(current, "__module__", "").startswith(prefix):
            continue
        found.append(
            f"verl-cppo assumes the {kind} registry's {name!r} is its own; it holds {_registrant(current)} "
            f"(registered by another package or by verl itself). Set {REPLACE_ENV}=1 to use verl-cppo's, or "
            "leave verl-cppo out of this launch (VERL_USE_EXTERNAL_PLUGINS) to use the other"
        )
    return found


def _config_field_violations() -> list[str]:
    import dataclasses

    from verl.trainer.config import AlgoConfig
    from verl.workers.config import PolicyLossConfig

    found = []
    for cls, field in ((PolicyLossConfig, "cppo"), (AlgoConfig, "cppo_grpo")):
        if field in {f.name for f in dataclasses.fields(cls)}:
            found.append(
                f"verl-cppo assumes verl's {cls.__module__}.{cls.__name__} has no {field!r} field (verl-cppo's "
                f"config class carries it); this verl defines one"
            )
    return found


def _data_plane(trainer: Mapping) -> str:
    """The legacy trainer's batch container, by the rule of verl's ``neo`` branch (``data_plane.py``:
    ``trainer.data_plane``, default classic, upgraded by ``use_neoproto``). A verl that ships NeoProto and has
    no ``data_plane`` key made NeoProto the only container (verl PR #7557)."""
    if "data_plane" not in trainer:
        return "neoproto"
    name = str(trainer.get("data_plane") or "classic")
    return "neoproto" if name == "classic" and trainer.get("use_neoproto", False) else name


def _column_violations(config: Mapping | None) -> list[str]:
    if _module_file("verl.experimental.neoproto") is None:
        return []
    trainer = config.get("trainer", {}) if isinstance(config, Mapping) else {}
    if _data_plane(trainer if isinstance(trainer, Mapping) else {}) != "neoproto":
        return []
    return [
        "verl-cppo assumes the trainer's batch carries every column it adds (cppo_grpo_keep, mu's top-K) to the "
        "workers; this launch's data plane is NeoProto (verl.experimental.neoproto), whose workers materialize "
        "only the keys they declare, so excluded groups would silently be trained on (trainer.data_plane=classic "
        "keeps the container verl-cppo supports)"
    ]


def _module_file(module: str) -> str | None:
    """The source file of ``module`` without importing it (nor its packages); None if absent."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return spec.origin if spec is not None and not rest else None
    base = os.path.join(next(iter(spec.submodule_search_locations)), *rest)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _parameters(tree: ast.Module, qualname: str) -> list[str] | None:
    """The parameter names of ``qualname`` defined in ``tree``; [] for a name bound by an import; None if absent."""
    scope: list[ast.stmt] = tree.body
    *owners, name = qualname.split(".")
    for owner in owners:
        classes = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == owner]
        if not classes:
            return None
        scope = classes[-1].body
    for node in reversed(scope):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            args = node.args
            return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return []
    return None


def _signature_violations(config: Mapping | None) -> list[str]:
    found = []
    for sig in SIGNATURES:
        if config is not None and not FEATURES[sig.feature](config):
            continue  # e.g. the Megatron shard-local loss's functions, for a launch without it
        if importlib.util.find_spec(sig.module.split(".")[0]) is None:
            continue  # vLLM not installed on this node: nothing of it will run here
        where = f"{sig.module}.{sig.qualname}"
        path = _module_file(sig.module)
        if path is None:
            found.append(f"verl-cppo assumes {sig.module} exists ({sig.used_by}); it is not installed")
            continue
        with open(path, encoding="utf-8") as f:
            params = _parameters(ast.parse(f.read()), sig.qualname)
        if params is None:
            found.append(f"verl-cppo assumes {where} exists ({sig.used_by}); {path} does not define it")
            continue
        missing = [p for p in sig.params if p not in params]
        if missing:
            found.append(
                f"verl-cppo assumes {where} takes {list(sig.params)} ({sig.used_by}); it has no {missing} "
                f"(its parameters: {params})"
            )
    return found


def _diff_violations(config: Mapping | None) -> list[str]:
    found = []
    for path in sorted(PATCH_DIR.glob("*.diff")):
        feature = path.name.split("_", 1)[0]
        if config is not None and not FEATURES.get(feature, FEATURES["always"])(config):
            continue
        for patch in parse_diff(path.read_text(encoding="utf-8"), path.name):
            source = _module_file(patch.module)
            if source is None:
                found.append(f"verl-cppo assumes {patch.module} exists (its diff {path.name}); it is not installed")
                continue
            try:
                with open(source, encoding="utf-8") as f:
                    apply_diff(f.read(), patch)
            except PatchError as error:
                found.append(f"verl-cppo assumes its diff {path.name} applies to {source}: {error}")
    return found


def violations(config: Mapping | None = None) -> list[str]:
    """Every broken assumption (for the composed trainer ``config``, where one depends on it), one message
    each, ending with the supported and the installed verl."""
    import verl

    found = [
        *_registration_violations(),
        *_config_field_violations(),
        *_column_violations(config),
        *_signature_violations(config),
        *_diff_violations(config),
    ]
    version = getattr(verl, "__version__", "?")
    return [f"{message} [verl-cppo supports verl {SUPPORTED_VERL}; installed: verl {version}]" for message in found]
