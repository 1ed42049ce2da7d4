"""Compose verl 0.9.1's real trainer config (verl/trainer/config/ppo_trainer.yaml) the way main_ppo does."""

import os

import verl
from hydra import compose, initialize_config_dir

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
ENGINES = ["dp", "megatron"]  # model_engine=dp -> dp_actor.yaml (FSDP), megatron -> megatron_actor.yaml
CPPO_TARGET = "actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.CPPOPolicyLossConfig"
# verl's stock config leaves the micro-batch sizes and the rollout backend (`???`) unset; every real launch
# sets them (a later override of the same key wins).
MICRO_BATCHES = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.name=vllm",
]


def compose_trainer(engine: str, overrides=(), config_name="ppo_trainer", config_dir=VERL_CONFIG_DIR):
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name, overrides=[f"model_engine={engine}", *MICRO_BATCHES, *overrides])
