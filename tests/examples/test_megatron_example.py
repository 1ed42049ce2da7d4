"""The Megatron example launches the engine path the CPU equivalence proves (sizes and CUDA-only settings aside).

tests/e2e/test_megatron_equivalence.py trains through verl's Megatron engine with the settings of
``verl_cppo.testing.cpu_megatron.PROVEN_ENGINE`` (and ``PROVEN_EXTERNAL_LIB``, the shard-local loss). The example
script's dry run, with the CP = 2 of those runs and a local model (so verl builds the model config and imports
``external_lib`` as a worker would), must compose to an actor whose Megatron config has every one of those
values, and must import the shard-local hook. What differs, on purpose, is listed in ``DIFFERENT_BY_DESIGN`` with
the reason, and checked to differ (so the list stays true).
"""

import pytest

from examples import dry_run
from tests.examples.test_examples import MEGATRON_SCRIPT, _overrides
from verl_cppo.testing.cpu_megatron import PROVEN_ENGINE, PROVEN_EXTERNAL_LIB

DIFFERENT_BY_DESIGN = {
    "dtype": "bfloat16",  # verl's only dtypes; the CPU equivalence runs float32 to compare at float32 rounding
    "sequence_parallel": True,  # needs TE's norm (torch's refuses it); the CPU runs turn it off
    "use_dynamic_bsz": True,  # token-budget micro-batches; the equivalence fixes the rows of each micro-batch
    "param_offload": True,  # vLLM holds the GPUs between updates; nothing to offload on CPU
}


@pytest.fixture
def tiny_model(tmp_path):
    from verl_cppo.testing import tiny_task

    tiny_task.build_model(seed=0, head_dim=32).save_pretrained(tmp_path)
    tiny_task.build_tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.fixture
def restore_shard_local_hook():
    from verl_cppo.sharding import megatron

    was_installed = megatron.installed()
    yield megatron
    if not was_installed:
        megatron.uninstall()


def test_megatron_example_launches_the_cpu_proven_engine_path(tiny_model, restore_shard_local_hook):
    report = dry_run.dry_run(_overrides(MEGATRON_SCRIPT, CP_SIZE="2", ACTOR_TP="2", MODEL_PATH=tiny_model))
    assert report.errors == [], report.errors
    actor, model = report.built["actor"], report.built["model"]
    engine = actor.megatron
    assert {key: engine[key] for key in PROVEN_ENGINE} == PROVEN_ENGINE
    assert engine.context_parallel_size == 2 and engine.tensor_model_parallel_size == 2
    assert model.external_lib == PROVEN_EXTERNAL_LIB and model.use_remove_padding
    assert restore_shard_local_hook.installed()  # building the model config imported the hook, as a worker does
    assert actor.policy_loss.loss_mode == "cppo"
    assert {key: engine[key] for key in DIFFERENT_BY_DESIGN} == DIFFERENT_BY_DESIGN


@pytest.mark.parametrize(("env", "lib"), [({}, PROVEN_EXTERNAL_LIB), ({"METHOD": "dppo_topk_tv"}, "verl_cppo"),
                                           ({"DIVERGENCE": "topk_tv"}, "verl_cppo")])  # fmt: skip
def test_top_k_runs_keep_the_gathered_path(env, lib):
    """The driver refuses a Top-K divergence with the shard-local hook (D reaches the loss through verl's gathered
    outputs): the script leaves the hook out for those runs."""
    assert f"actor_rollout_ref.model.external_lib={lib}" in _overrides(MEGATRON_SCRIPT, **env)


def test_the_cpu_main_ppo_runs_launch_the_proven_engine_path():
    """``ci/multirank_runs.py``'s Megatron layouts (``launcher.megatron_actor_overrides`` through the tiny task's
    command line) compose, through verl's own trainer config, to the engine of the CPU equivalence: every
    ``PROVEN_ENGINE`` value, float32, no sequence parallelism, the CPU transformer overrides, the shard-local
    loss, and the layout's TP / CP."""
    from omegaconf import OmegaConf

    from ci.multirank_runs import MEGATRON_LAYOUTS, layout_overrides
    from verl_cppo.launch.dry_run import compose_config
    from verl_cppo.testing import launcher
    from verl_cppo.testing.cpu_megatron import OVERRIDE_TRANSFORMER_CONFIG

    task = {"train": "/t/train.parquet", "val": "/t/val.parquet", "model": "/t/model"}
    for layout, (tp, cp) in MEGATRON_LAYOUTS.items():
        overrides = [
            *launcher.tiny_task_overrides(task, engine="megatron"),
            *launcher.ARMS["cppo"].overrides,
            *layout_overrides(layout),
        ]
        config = compose_config(overrides)
        actor = config.actor_rollout_ref.actor
        engine = OmegaConf.to_container(actor.megatron, resolve=True)
        assert actor.strategy == "megatron" and "fsdp_config" not in actor, layout
        assert {key: engine.get(key, actor.get(key)) for key in PROVEN_ENGINE if key != "strategy"} == {
            key: value for key, value in PROVEN_ENGINE.items() if key != "strategy"
        }, layout
        assert (engine["dtype"], engine["sequence_parallel"]) == ("float32", False)
        assert (engine["tensor_model_parallel_size"], engine["context_parallel_size"]) == (tp, cp)
        assert config.trainer.n_gpus_per_node == tp * cp
        assert OVERRIDE_TRANSFORMER_CONFIG.items() <= engine["override_transformer_config"].items()
        assert config.actor_rollout_ref.model.external_lib == PROVEN_EXTERNAL_LIB
        assert config.actor_rollout_ref.model.use_remove_padding
