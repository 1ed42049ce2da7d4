#!/usr/bin/env bash
# CPPO | Qwen3-1.7B (post-trained) | FSDP2 actor, vLLM rollout | 1 node x 8 GPUs | paper Table 3, row 1
# 64 prompts x 8 responses per rollout, mini-batch 32 prompts (2 updates), 8k responses, lr 1e-6,
# delta 0.15, w_min 0.8, fixed delta_b 0.015, ratio cap 20; anchored on the rollout's log-probs.
#
#   bash examples/run_qwen3_1.7b_fsdp.sh                        # CPPO on this node (or LAUNCHER=ray)
#   METHOD=dppo_tv bash examples/run_qwen3_1.7b_fsdp.sh         # a baseline / ablation on the same setting
#   CPPO_DRY_RUN=1 bash examples/run_qwen3_1.7b_fsdp.sh         # check the whole config on a CPU
#   bash examples/run_qwen3_1.7b_fsdp.sh trainer.total_epochs=1 # extra Hydra overrides go last
# Every knob is an environment variable; see examples/README.md.
set -euo pipefail

RUN_NAME=qwen3_1.7b
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-1.7B}
NNODES=${NNODES:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64}
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-32}
ROLLOUT_N=${ROLLOUT_N:-8}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
DELTA=${DELTA:-0.15}
DELTA_B=${DELTA_B:-0.015}
DELTA_B_QUANTILE=${DELTA_B_QUANTILE:-null} # null: fixed delta_b (the post-trained model)
ROLLOUT_TP=${ROLLOUT_TP:-1}
SP_SIZE=${SP_SIZE:-1}

# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENGINE=(
    actor_rollout_ref.actor.strategy=fsdp2
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=${SP_SIZE}"
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
)
cppo_launch "${ENGINE[@]}" "$@"
