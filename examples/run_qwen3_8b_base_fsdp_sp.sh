#!/usr/bin/env bash
# CPPO | Qwen3-8B-Base | FSDP2 actor with Ulysses SP, vLLM rollout | 2 nodes x 8 GPUs | paper Table 3, row 3
# 128 prompts x 8 responses per rollout, mini-batch 32 prompts (4 updates), 8k responses, lr 1e-6,
# delta 0.15, w_min 0.8, delta_b calibrated per response (P90 of D clamped to [0.02, 0.04]), ratio cap 20;
# anchored on the rollout's log-probs.
#
#   RAY_ADDRESS=http://head:8265 bash examples/run_qwen3_8b_base_fsdp_sp.sh   # ray job submit (NNODES > 1)
#   METHOD=cppo_no_prefix_budget bash examples/run_qwen3_8b_base_fsdp_sp.sh   # an ablation, same setting
#   CPPO_DRY_RUN=1 bash examples/run_qwen3_8b_base_fsdp_sp.sh                # check the whole config on a CPU
# Every knob is an environment variable; see examples/README.md.
set -euo pipefail

RUN_NAME=qwen3_8b_base
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-8B-Base}
NNODES=${NNODES:-2}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-32}
ROLLOUT_N=${ROLLOUT_N:-8}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
DELTA=${DELTA:-0.15}
DELTA_B=${DELTA_B:-0.02}
DELTA_B_QUANTILE=${DELTA_B_QUANTILE:-0.9} # calibrated delta_b (Base models)
ROLLOUT_TP=${ROLLOUT_TP:-2}
SP_SIZE=${SP_SIZE:-2} # Ulysses sequence parallel; must divide the model's 8 KV heads

# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENGINE=(
    actor_rollout_ref.actor.strategy=fsdp2
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=${SP_SIZE}"
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
)
cppo_launch "${ENGINE[@]}" "$@"
