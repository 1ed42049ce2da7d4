#!/usr/bin/env bash
# CPPO | Qwen3-30B-A3B-Base (MoE) | Megatron actor TP=4 EP=8, vLLM rollout TP=2 | 4 nodes x 8 GPUs |
# paper Table 3, row 4. 256 prompts x 16 responses per rollout, mini-batch 32 prompts (8 updates), 16k
# responses, lr 1e-6, delta 0.20, w_min 0.8, delta_b calibrated per response (P90 of D clamped to
# [0.02, 0.04]), ratio cap 20; anchored on the rollout's log-probs. CP_SIZE=2 adds context parallelism.
#
#   RAY_ADDRESS=http://head:8265 bash examples/run_qwen3_30b_a3b_base_megatron.sh  # ray job submit
#   METHOD=grpo_clip_higher bash examples/run_qwen3_30b_a3b_base_megatron.sh       # a baseline, same setting
#   CPPO_DRY_RUN=1 bash examples/run_qwen3_30b_a3b_base_megatron.sh                # check the config on a CPU
# Every knob is an environment variable; see examples/README.md.
set -euo pipefail

RUN_NAME=qwen3_30b_a3b_base
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-30B-A3B-Base}
NNODES=${NNODES:-4}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-32}
ROLLOUT_N=${ROLLOUT_N:-16}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-16384}
DELTA=${DELTA:-0.20}
DELTA_B=${DELTA_B:-0.02}
DELTA_B_QUANTILE=${DELTA_B_QUANTILE:-0.9} # calibrated delta_b (Base models)
ROLLOUT_TP=${ROLLOUT_TP:-2}
ACTOR_TP=${ACTOR_TP:-4}
ACTOR_PP=${ACTOR_PP:-1}
ACTOR_EP=${ACTOR_EP:-8}
ACTOR_ETP=${ACTOR_ETP:-1}
CP_SIZE=${CP_SIZE:-1}
# The bridge the CPU equivalence runs (tests/e2e/test_megatron_equivalence.py): mbridge ("vanilla"). verl's
# default, Megatron-Bridge (VANILLA_MBRIDGE=False), needs Transformer Engine and is not exercised by the CPU tests.
VANILLA_MBRIDGE=${VANILLA_MBRIDGE:-True}
# The shard-local CPPO loss under CP > 1 (no all-gather of per-token log-probs; a no-op at CP = 1). It imports the
# plugin too, so it takes common.sh's external_lib=verl_cppo's place. A Top-K divergence reaches the loss through
# verl's gathered path, which the driver requires: those runs keep external_lib=verl_cppo.
case "${METHOD:-cppo}:${DIVERGENCE:-binary_tv}" in
    dppo_topk_*:* | *:topk_*) EXTERNAL_LIB=verl_cppo ;;
    *) EXTERNAL_LIB=verl_cppo.megatron_shard_local ;;
esac
OFFLOAD=${OFFLOAD:-True} # param + optimizer offload while vLLM holds the GPUs

# Megatron's TP/SP communication overlap needs one CUDA hardware queue (as verl's Megatron scripts export).
# verl sets it for Ray workers only when the driver itself sees a Hopper/Ampere GPU, which a CPU-only head
# node or a `ray job submit` entrypoint does not; so export it here (a Ray started by this driver inherits it)
# and pass it to every Ray process of the job (below), whatever the launcher.
export CUDA_DEVICE_MAX_CONNECTIONS=1

# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENGINE=(
    model_engine=megatron
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=${ACTOR_TP}"
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=${ACTOR_PP}"
    "actor_rollout_ref.actor.megatron.expert_model_parallel_size=${ACTOR_EP}"
    "actor_rollout_ref.actor.megatron.expert_tensor_parallel_size=${ACTOR_ETP}"
    "actor_rollout_ref.actor.megatron.context_parallel_size=${CP_SIZE}"
    "actor_rollout_ref.actor.megatron.param_offload=${OFFLOAD}"
    "actor_rollout_ref.actor.megatron.optimizer_offload=${OFFLOAD}"
    actor_rollout_ref.actor.megatron.use_mbridge=True
    "actor_rollout_ref.actor.megatron.vanilla_mbridge=${VANILLA_MBRIDGE}"
    actor_rollout_ref.actor.megatron.use_distributed_optimizer=True
    "actor_rollout_ref.model.external_lib=${EXTERNAL_LIB}"
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1
    +actor_rollout_ref.actor.megatron.override_transformer_config.moe_router_dtype=fp32
    +actor_rollout_ref.actor.megatron.override_transformer_config.moe_permute_fusion=True
    "+ray_kwargs.ray_init.runtime_env.env_vars.CUDA_DEVICE_MAX_CONNECTIONS='1'"
)
cppo_launch "${ENGINE[@]}" "$@"
