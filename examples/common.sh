# shellcheck shell=bash
# Shared part of the run_*.sh scripts (sourced, not run): the paper's common settings, the METHOD switch for
# baselines and ablations, and the launcher. A run_*.sh script sets its model's values (MODEL_PATH,
# TRAIN_BATCH_SIZE, DELTA, ... see any of them), sources this file, builds its engine overrides and calls
#     cppo_launch "${ENGINE[@]}" "$@"
# which assembles the ONE override list of the run and hands it to exactly one of:
#     CPPO_DRY_RUN=1      python examples/dry_run.py     compose + validate + instantiate, no Ray, no GPU
#     LAUNCHER=ray        ray job submit ... -- python3 -m verl.trainer.main_ppo   (default when NNODES > 1)
#     LAUNCHER=local      python3 -m verl.trainer.main_ppo   (default on 1 node; joins the Ray cluster named by
#                         RAY_ADDRESS=<head>:6379 or a running local one: examples/slurm, examples/kuberay)
#     CPPO_PRINT_CMD=1    print the launch command (pasteable: one quoted argument a line, continued) and exit
# Before a real launch (not the dry run, not CPPO_PRINT_CMD, which only warn) cppo_preflight stops with a
# message when the launch would fail or lose results after Ray starts: wandb asked for without a key the job
# can reach, or a multi-node run without an explicit (shared) CKPTS_DIR.

EXAMPLES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "${EXAMPLES_DIR}/.." && pwd)

# ---- method: the paper's CPPO, its baselines, its ablations (same data, model, batch, anchor) ----
#   cppo                     CPPO (position weight + prefix budget)
#   cppo_no_position_weight  ablation: w_t = 1
#   cppo_no_prefix_budget    ablation: token-level position-weighted threshold only
#   dppo_tv                  verl's built-in DPPO binary-TV, threshold DELTA
#   dppo_topk_tv             the paper's "DPPO (Top-K TV)" row: CPPO with w_min=1 and no prefix budget, i.e.
#                            keep a token iff A_t (rho_t - 1) <= 0 or D_t <= DELTA, D = Top-K TV (K=TOPK)
#   dppo_topk_kl             the same with D = Top-K KL(mu || pi)
#   grpo_clip_higher         GRPO / PPO ratio clip with clip-higher 0.2 / 0.28
METHOD=${METHOD:-cppo}
# Per-token divergence of CPPO. The paper's main tables use topk_tv (K=TOPK=20): the rollout then returns mu's
# top-K log-probs and the engine computes D on pi's logits (README "Top-K divergences"). The default is
# binary_tv, the path that has run end to end the most (README "What has run where": nothing has run on GPUs).
DIVERGENCE=${DIVERGENCE:-binary_tv}
TOPK=${TOPK:-20}
W_MIN=${W_MIN:-0.8}
DELTA_B_SCALE=${DELTA_B_SCALE:-1.0}
DELTA_B_MAX_MULT=${DELTA_B_MAX_MULT:-2.0}
# H of the position weight: null = each response's own length (the paper's text and its official UniRL code);
# an int (e.g. the max response length) = a fixed horizon, as the authors' verl port gets from fixed padding.
POSITION_HORIZON=${POSITION_HORIZON:-null}
RATIO_CAP=${RATIO_CAP:-20.0}
ADV_ESTIMATOR=${ADV_ESTIMATOR:-cppo_grpo}
ACTOR_LR=${ACTOR_LR:-1e-6}

# ---- cluster, paths, logging ----
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
RAY_DATA_HOME=${RAY_DATA_HOME:-${HOME}/verl}
DATA_DIR=${DATA_DIR:-${RAY_DATA_HOME}/data}
TRAIN_FILE=${TRAIN_FILE:-${DATA_DIR}/dapo-math-17k.parquet}
VAL_FILES=${VAL_FILES:-${DATA_DIR}/aime-2024.parquet,${DATA_DIR}/aime-2025.parquet,${DATA_DIR}/aime-2026.parquet}
PROJECT_NAME=${PROJECT_NAME:-verl_cppo}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-${RUN_NAME}_${METHOD}}
# Checkpoints: every node writes its ranks' shards under CKPTS_DIR and a resumed job reads them from whichever
# node it lands on, so a multi-node run must name a shared filesystem path explicitly (cppo_preflight).
CKPTS_DIR_GIVEN=${CKPTS_DIR:+1}
CKPTS_DIR=${CKPTS_DIR:-${RAY_DATA_HOME}/ckpts/${PROJECT_NAME}/${EXPERIMENT_NAME}}
# Logging: console + wandb (WANDB_API_KEY, passed to the Ray job when set) or e.g. LOGGER=[console,tensorboard]
# (event files under TENSORBOARD_DIR, exported to every Ray process: make it a shared path on several nodes).
LOGGER=${LOGGER:-[console,wandb]}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${RAY_DATA_HOME}/tensorboard/${PROJECT_NAME}/${EXPERIMENT_NAME}}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-10}
TEST_FREQ=${TEST_FREQ:-10}
# A checkpoint at every validation (the paper reports the best validated checkpoint). Disk stays bounded:
# KEEP_CKPTS latest checkpoints for resume, plus (KEEP_BEST_CKPT=1) the best one by BEST_METRIC, pruned by
# verl_cppo.trainer.checkpoints.KeepLatestAndBest; KEEP_BEST_CKPT=0 leaves it to verl's max_actor_ckpt_to_keep.
SAVE_FREQ=${SAVE_FREQ:-${TEST_FREQ}}
KEEP_CKPTS=${KEEP_CKPTS:-2}
KEEP_BEST_CKPT=${KEEP_BEST_CKPT:-1}
VAL_N=${VAL_N:-16}
BEST_METRIC=${BEST_METRIC:-val-core/aime_avg/acc/mean@${VAL_N}}
ROLLOUT_GPU_MEM_UTIL=${ROLLOUT_GPU_MEM_UTIL:-0.7}
PPO_MAX_TOKEN_LEN_PER_GPU=${PPO_MAX_TOKEN_LEN_PER_GPU:-$((2 * (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH)))}
if [ "${NNODES}" -gt 1 ]; then LAUNCHER=${LAUNCHER:-ray}; else LAUNCHER=${LAUNCHER:-local}; fi
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
WORKING_DIR=${WORKING_DIR:-${REPO_ROOT}}
RUNTIME_ENV=${RUNTIME_ENV:-${EXAMPLES_DIR}/runtime_env.yaml}
PYTHON=${PYTHON:-python3}

# "a,b,c" -> "['a','b','c']" (Hydra list of quoted strings; no globbing of the items)
cppo_hydra_list() {
    local -a items
    local item out=""
    IFS=, read -ra items <<<"$1"
    for item in "${items[@]}"; do out+="${out:+,}'${item}'"; done
    printf "[%s]" "${out}"
}

cppo_method_overrides() {
    local loss=actor_rollout_ref.actor.policy_loss position_weight=true prefix_budget=true w_min=${W_MIN}
    case "${METHOD}" in
        cppo) ;;
        cppo_no_position_weight) position_weight=false ;;
        cppo_no_prefix_budget) prefix_budget=false ;;
        dppo_topk_tv | dppo_topk_kl)
            # CPPO's exact special case: w_t = 1 everywhere and no budget leave DPPO's rule on D (spec,
            # "Special cases"); tests/examples/test_dppo_topk.py checks it token for token
            w_min=1.0 prefix_budget=false DIVERGENCE=${METHOD#dppo_}
            ;;
        dppo_tv)
            METHOD_ARGS=(
                "${loss}.loss_mode=dppo_tv"
                "actor_rollout_ref.actor.clip_ratio_low=${DELTA}"
                "actor_rollout_ref.actor.clip_ratio_high=${DELTA}"
                "actor_rollout_ref.actor.clip_ratio_c=${RATIO_CAP}"
            )
            return 0
            ;;
        grpo_clip_higher)
            METHOD_ARGS=(
                "${loss}.loss_mode=vanilla"
                actor_rollout_ref.actor.clip_ratio_low=0.2
                actor_rollout_ref.actor.clip_ratio_high=0.28
                actor_rollout_ref.actor.clip_ratio_c=10.0
            )
            return 0
            ;;
        *)
            echo "METHOD=${METHOD} is not one of: cppo cppo_no_position_weight cppo_no_prefix_budget dppo_tv" \
                "dppo_topk_tv dppo_topk_kl grpo_clip_higher" >&2
            return 1
            ;;
    esac
    METHOD_ARGS=(
        "${loss}._target_=verl_cppo.config.CPPOPolicyLossConfig"
        "${loss}.loss_mode=cppo"
        "+${loss}.cppo.delta=${DELTA}"
        "+${loss}.cppo.w_min=${w_min}"
        "+${loss}.cppo.delta_b=${DELTA_B}"
        "+${loss}.cppo.delta_b_quantile=${DELTA_B_QUANTILE}"
        "+${loss}.cppo.delta_b_scale=${DELTA_B_SCALE}"
        "+${loss}.cppo.delta_b_max_mult=${DELTA_B_MAX_MULT}"
        "+${loss}.cppo.position_horizon=${POSITION_HORIZON}"
        "+${loss}.cppo.divergence=${DIVERGENCE}"
        "+${loss}.cppo.ratio_cap=${RATIO_CAP}"
        "+${loss}.cppo.position_weight=${position_weight}"
        "+${loss}.cppo.prefix_budget=${prefix_budget}"
    )
    case "${DIVERGENCE}" in
        topk_*)
            # K of the Top-K divergence; the driver exports it to every Ray process (rollout servers included).
            TOPK_ARGS=("+${loss}.cppo.topk=${TOPK}")
            if [ "${TOPK}" -gt 20 ]; then  # vLLM returns at most max_logprobs (default 20) log-probs per token
                TOPK_ARGS+=("+actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs=${TOPK}")
            fi
            METHOD_ARGS+=("${TOPK_ARGS[@]}")
            ;;
    esac
}

cppo_common_overrides() {
    COMMON_ARGS=(
        # data: DAPO-Math-17k for training, AIME 2024/2025/2026 for validation (examples/data/prepare_data.py)
        "data.train_files=$(cppo_hydra_list "${TRAIN_FILE}")"
        "data.val_files=$(cppo_hydra_list "${VAL_FILES}")"
        data.prompt_key=prompt
        "data.train_batch_size=${TRAIN_BATCH_SIZE}"
        "data.max_prompt_length=${MAX_PROMPT_LENGTH}"
        "data.max_response_length=${MAX_RESPONSE_LENGTH}"
        data.filter_overlong_prompts=True
        data.truncation=error
        # outcome advantage: cppo_grpo's defaults are the paper's (group mean-centred, no std division,
        # zero-variance groups excluded; its settings: +algorithm.cppo_grpo.<key>). No KL.
        "algorithm.adv_estimator=${ADV_ESTIMATOR}"
        algorithm.use_kl_in_reward=False
        critic.enable=False
        # anchor on the rollout policy mu: old_log_prob = the rollout's log-probs (v1 trainer)
        algorithm.rollout_correction.bypass_mode=True
        trainer.use_v1=True
        actor_rollout_ref.rollout.calculate_log_probs=True
        # model; external_lib imports the plugin in every actor worker even without the entry point
        "actor_rollout_ref.model.path=${MODEL_PATH}"
        actor_rollout_ref.model.external_lib=verl_cppo
        actor_rollout_ref.model.use_remove_padding=True
        actor_rollout_ref.model.enable_gradient_checkpointing=True
        # actor: AdamW lr 1e-6 (verl's default grad-norm clip 1.0), TRAIN/MINI updates per rollout, no KL, no
        # entropy term, loss summed per response and divided by a constant horizon = max_response_length
        "actor_rollout_ref.actor.optim.lr=${ACTOR_LR}"
        "actor_rollout_ref.actor.ppo_mini_batch_size=${PPO_MINI_BATCH_SIZE}"
        actor_rollout_ref.actor.ppo_epochs=1
        actor_rollout_ref.actor.use_kl_loss=False
        actor_rollout_ref.actor.entropy_coeff=0
        actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm
        "actor_rollout_ref.actor.loss_scale_factor=${MAX_RESPONSE_LENGTH}"
        actor_rollout_ref.actor.use_dynamic_bsz=True
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=${PPO_MAX_TOKEN_LEN_PER_GPU}"
        # rollout: vLLM, temperature 1, mu's log-probs for every sampled token; Avg@VAL_N validation
        actor_rollout_ref.rollout.name=vllm
        "actor_rollout_ref.rollout.n=${ROLLOUT_N}"
        "actor_rollout_ref.rollout.tensor_model_parallel_size=${ROLLOUT_TP}"
        "actor_rollout_ref.rollout.gpu_memory_utilization=${ROLLOUT_GPU_MEM_UTIL}"
        actor_rollout_ref.rollout.temperature=1.0
        actor_rollout_ref.rollout.top_p=1.0
        actor_rollout_ref.rollout.top_k=-1
        actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=${PPO_MAX_TOKEN_LEN_PER_GPU}"
        "actor_rollout_ref.rollout.val_kwargs.n=${VAL_N}"
        actor_rollout_ref.rollout.val_kwargs.do_sample=True
        actor_rollout_ref.rollout.val_kwargs.temperature=1.0
        actor_rollout_ref.rollout.val_kwargs.top_p=1.0
        # reward: math-verify on the response's final answer (verl_cppo/math_task/reward.py)
        reward.custom_reward_function.path=pkg://verl_cppo.math_task.reward
        reward.custom_reward_function.name=compute_score
        # trainer
        "trainer.logger=${LOGGER}"
        "trainer.project_name=${PROJECT_NAME}"
        "trainer.experiment_name=${EXPERIMENT_NAME}"
        "trainer.n_gpus_per_node=${NGPUS_PER_NODE}"
        "trainer.nnodes=${NNODES}"
        trainer.critic_warmup=0
        trainer.balance_batch=True
        trainer.val_before_train=True
        "trainer.test_freq=${TEST_FREQ}"
        "trainer.save_freq=${SAVE_FREQ}"
        "trainer.total_epochs=${TOTAL_EPOCHS}"
        "trainer.default_local_dir=${CKPTS_DIR}"
        trainer.resume_mode=auto
    )
    if [ "${ADV_ESTIMATOR}" = grpo ]; then # verl's grpo without its std division, as cppo_grpo's default
        COMMON_ARGS+=(algorithm.norm_adv_by_std_in_grpo=False)
    fi
    if [ "${KEEP_BEST_CKPT}" = 1 ]; then
        COMMON_ARGS+=(
            trainer.max_actor_ckpt_to_keep=null # pruned by the callback, which keeps the best one too
            trainer.checkpoint_callback_class=verl_cppo.trainer.checkpoints.KeepLatestAndBest
            "+trainer.cppo_checkpoints.keep_latest=${KEEP_CKPTS}"
            "+trainer.cppo_checkpoints.best_metric=${BEST_METRIC}"
        )
    else
        COMMON_ARGS+=("trainer.max_actor_ckpt_to_keep=${KEEP_CKPTS}")
    fi
    case "${LOGGER}" in
        *tensorboard*) # read by verl's tracker in the trainer process: export it to every Ray process
            COMMON_ARGS+=("+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR='${TENSORBOARD_DIR}'") ;;
    esac
}

# Variables passed to the Ray job's runtime env when set in the submitting shell (LAUNCHER=ray). They go
# into a generated runtime-env file (mode 600), never onto a command line: main_ppo prints its Hydra
# overrides and `ray job submit` arguments show in the process list.
RUNTIME_ENV_PASSTHROUGH=${RUNTIME_ENV_PASSTHROUGH:-WANDB_API_KEY WANDB_ENTITY WANDB_BASE_URL WANDB_MODE HF_TOKEN}

# The problems a real launch would only hit after Ray started (or that lose its results), one per line.
cppo_preflight_problems() {
    local mode=${WANDB_MODE:-online}
    case "${LOGGER}" in
        *wandb*)
            if [ -z "${WANDB_API_KEY:-}" ] && [[ ! "${mode}" =~ ^(offline|disabled|dryrun)$ ]]; then
                if [ "${LAUNCHER}" = ray ]; then
                    echo "LOGGER=${LOGGER} logs to wandb, but WANDB_API_KEY is not set: the Ray job would stop at" \
                        "wandb.init (a 'wandb login' on this machine does not reach the cluster). Export" \
                        "WANDB_API_KEY (it is passed through the job's runtime env), or set" \
                        "LOGGER=[console,tensorboard], or WANDB_MODE=offline (WANDB_DIR on a shared path)."
                elif ! grep -qs "api.wandb.ai" "${NETRC:-${HOME}/.netrc}"; then
                    echo "LOGGER=${LOGGER} logs to wandb, but there is no W&B key (WANDB_API_KEY unset, no" \
                        "'wandb login' entry in ~/.netrc): main_ppo would stop at wandb.init. Export" \
                        "WANDB_API_KEY, or set LOGGER=[console,tensorboard], or WANDB_MODE=offline."
                fi
            fi
            ;;
    esac
    if [ "${NNODES}" -gt 1 ] && [ -z "${CKPTS_DIR_GIVEN}" ]; then
        echo "NNODES=${NNODES}: set CKPTS_DIR to a directory on a filesystem every node shares (every node" \
            "writes its shards there and a resumed job reads them from any node); the default" \
            "${CKPTS_DIR} is a path on each node's own disk unless \$HOME is shared."
    fi
}

# Stop a real launch on any preflight problem; a dry run or CPPO_PRINT_CMD=1 only warns.
cppo_preflight() {
    local problems line prefix="error: "
    problems=$(cppo_preflight_problems)
    [ -z "${problems}" ] && return 0
    if [ "${CPPO_DRY_RUN:-0}" = 1 ] || [ "${CPPO_PRINT_CMD:-0}" = 1 ]; then
        prefix="warning: a real launch would stop here: "
    fi
    while IFS= read -r line; do echo "${prefix}${line}" >&2; done <<<"${problems}"
    [ "${prefix}" = "error: " ] || return 0
    return 1
}

# The runtime env of a ray job: examples/runtime_env.yaml plus the RUNTIME_ENV_PASSTHROUGH variables that are
# set (written to a private temporary file); RUNTIME_ENV itself when none is set.
cppo_runtime_env() {
    local name present=()
    for name in ${RUNTIME_ENV_PASSTHROUGH}; do
        [ -n "${!name:-}" ] && present+=("${name}")
    done
    JOB_RUNTIME_ENV=${RUNTIME_ENV}
    [ "${#present[@]}" -eq 0 ] && return 0
    JOB_RUNTIME_ENV=$(umask 077 && mktemp "${TMPDIR:-/tmp}/cppo_runtime_env.XXXXXX.yaml")
    "${PYTHON}" - "${RUNTIME_ENV}" "${JOB_RUNTIME_ENV}" "${present[@]}" <<'PY'
import os, sys, yaml
source, target, names = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = yaml.safe_load(open(source)) or {}
spec.setdefault("env_vars", {}).update({name: os.environ[name] for name in names})
with open(target, "w") as f:
    yaml.safe_dump(spec, f, sort_keys=False)
PY
}

# ray job submit joins the entrypoint with subprocess.list2cmdline and the head node runs it with a shell.
# Escaping each argument with printf %q survives that round trip as long as no argument holds whitespace or a
# double quote (list2cmdline would wrap or escape those); such arguments are refused instead of mangled.
cppo_ray_entrypoint() {
    local arg
    ENTRYPOINT=()
    for arg in "$@"; do
        if [[ "${arg}" =~ [[:space:]\"] ]]; then
            echo "cannot pass an argument with whitespace or a double quote through ray job submit: ${arg}" >&2
            return 1
        fi
        ENTRYPOINT+=("$(printf '%q' "${arg}")")
    done
}

# The command, pasteable into a shell: each argument quoted as bash reads it back, one per line after the
# first, continued with a backslash.
cppo_print_command() {
    local sep=""
    while [ "$#" -gt 0 ]; do
        printf '%s%q' "${sep}" "$1"
        sep=$' \\\n    '
        shift
    done
    printf '\n'
}

cppo_launch() {
    local -a OVERRIDES CMD
    cppo_method_overrides
    cppo_common_overrides
    OVERRIDES=("${COMMON_ARGS[@]}" "${METHOD_ARGS[@]}" "$@")
    if [ "${LAUNCHER}" != ray ] && [ "${LAUNCHER}" != local ]; then
        echo "LAUNCHER=${LAUNCHER} is not one of: ray local" >&2
        return 1
    fi
    cppo_preflight || return 1
    if [ "${CPPO_DRY_RUN:-0}" != 1 ]; then
        local arg
        for arg in "$@"; do
            if [[ "${arg}" == -* ]]; then
                echo "${arg}: main_ppo takes the script's arguments as Hydra overrides (key=value, +key=value," \
                    "~key); options such as --quiet belong to the dry run (CPPO_DRY_RUN=1), which accepts them" \
                    "anywhere among the overrides" >&2
                return 1
            fi
        done
    fi
    if [ "${CPPO_DRY_RUN:-0}" = 1 ]; then
        CMD=("${PYTHON}" "${EXAMPLES_DIR}/dry_run.py" "${OVERRIDES[@]}")
    elif [ "${LAUNCHER}" = ray ]; then
        cppo_ray_entrypoint python3 -m verl.trainer.main_ppo "${OVERRIDES[@]}"
        cppo_runtime_env
        CMD=(ray job submit --address="${RAY_ADDRESS}" --runtime-env="${JOB_RUNTIME_ENV}"
            --working-dir="${WORKING_DIR}" -- "${ENTRYPOINT[@]}")
    else
        CMD=("${PYTHON}" -m verl.trainer.main_ppo "${OVERRIDES[@]}")
    fi
    if [ "${CPPO_PRINT_CMD:-0}" = 1 ]; then
        cppo_print_command "${CMD[@]}"
        [ "${JOB_RUNTIME_ENV:-${RUNTIME_ENV}}" != "${RUNTIME_ENV}" ] &&
            echo "note: ${JOB_RUNTIME_ENV} holds the passed-through variables (mode 600); delete it when done" >&2
        return 0
    fi
    if [ "${JOB_RUNTIME_ENV:-${RUNTIME_ENV}}" != "${RUNTIME_ENV}" ]; then
        # not exec: remove the file holding the key once `ray job submit` returns (or is interrupted)
        trap 'rm -f "${JOB_RUNTIME_ENV}"' EXIT
        "${CMD[@]}"
        return
    fi
    exec "${CMD[@]}"
}
