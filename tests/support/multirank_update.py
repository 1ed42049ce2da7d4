"""One rank of a CPPO actor update through verl's own worker path, on the CPU test platform (gloo).

Run by tests/e2e/test_multirank_equivalence.py as WORLD processes (env RANK / WORLD_SIZE, CPU switch on). Each
rank joins a gloo group through a FileStore with a collective timeout, then verl's ``TrainingWorker`` builds
the FSDP2 engine (``ulysses_sequence_parallel_size`` = SP, DP = WORLD / SP) around the tiny Qwen3 the rollout was
recorded with, and the update goes the way the v1 trainer sends it:
  1. the batch is the recorded vLLM rollout (tests/support/data/multirank_rollout.json) in the trainer's
     no-padding form (nested fields; ``old_log_probs`` = ``rollout_log_probs`` = mu, bypass mode; mu's top-K as
     ``rollout_topk_ids`` / ``rollout_topk_log_probs``; advantages from verl's registered ``cppo_grpo``
     estimator and, for the exclusion case, the ``cppo_grpo_keep`` field the trainer hook writes);
  2. the trainer's non-tensor fields (``global_batch_size`` = ``mini_batch_size`` = the batch, no shuffle, two
     epochs: the second sees pi moved off mu and masks tokens), split over the DP ranks by verl's own dispatch
     split (``_split_args_kwargs_data_proto``), fixed micro-batches of 4 (the same rows on every layout);
  3. ``TrainingWorker.train_mini_batch`` (what ``update_actor`` calls): verl's engine computes ``dp_size`` and
     the DP-global ``batch_num_tokens``, the loss is verl's ``ppo_loss`` (or the Top-K engine hook's
     ``ppo_loss_with_topk``) with ``loss_mode=cppo``.
Every case (comma-separated) runs in the same processes, each with a fresh worker. Rank 0 writes, per case, the
loss and grad norm of each optimizer step, the metrics reduced the trainer's way (``reduce_metrics``), the global
counts the loss saw on each micro-batch of each rank, and each optimizer step's full gradients and parameters before
and after it (``record_optimizer_steps``).

``--plant dp_size|tokens`` plants a count error in front of the loss (dp_size 1; the rank-local token count):
the equivalence test must then fail. Used once by hand (see ci/README.md), not in CI.

    python -m tests.support.multirank_update OUT STORE cppo,topk_tv,cppo_grpo SP [--plant dp_size|tokens]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

RECORD = os.path.join(os.path.dirname(__file__), "data", "multirank_rollout.json")
COLLECTIVE_TIMEOUT_S = 120
EPOCHS = 2  # the second pass over the batch sees pi moved away from mu: CPPO masks tokens there
MICRO_BATCH = 4  # per GPU: the recorded 16 responses are 4 micro-batches on one rank, 2 per rank on two DP ranks
# The equivalence tests' tolerances (FSDP: tests/e2e/test_multirank_equivalence.py, Megatron:
# tests/e2e/test_megatron_equivalence.py), derived (u = 2^-24, float32): the layouts change only the order of
# sums. Reordering a float32 sum of n terms moves it by at most 2 n u sum|terms|; the batch holds 264 tokens, so a
# token sum moves by at most 3.1e-5 of its absolute sum, doubled for the rounding-level differences of the
# per-token log-probs themselves.
with open(RECORD) as _f:
    TOKENS = sum(len(r["prompt"]) + len(r["response"]) for r in json.load(_f)["rows"])  # 264
SUM_RTOL = 4 * TOKENS * 2.0**-24  # 6.3e-5
# * every actor/cppo_* metric is a mean, share or max of non-negative per-token values: its absolute sum is the
#   value itself, so |a - b| <= SUM_RTOL |b|. A count moves only if a token's divergence lies within rounding of
#   its threshold (a jump of 1/264, refused: at ~1e-7 per value that is far under 1e-3 per run);
# * the loss sums signed terms A rho (GRPO advantages of groups of 4, std-normalised: |A| <= 3 / sqrt(4) = 1.5),
#   so its absolute sum is at most 1.5 rho_max (the one-rank run's own metric): |a - b| <= SUM_RTOL 1.5 rho_max;
# * the gradient norm: | |g_m| - |g_1| | <= |g_m - g_1| <= GRAD_RTOL |g_1| by the per-tensor gradient bound below.
# Gradients, per tensor in the 2-norm. DP, SP, TP and CP change only the order in which each gradient entry's float32
# terms are added; reordering a sum of n terms moves it by at most 2 n u sum|terms| (u = 2^-24). Along this
# backward a weight entry sums the batch's 264 tokens after about ten chained inner products of at most 128
# terms: n <= ~1,600, 2 n u = 1.9e-4. The tensor's norm stands in for sum|terms| (entries whose terms cancel weigh
# little in the norm): a factor of 5 covers that, so 1e-3. The planted count errors move gradients by >= 50%.
GRAD_RTOL = 1e-3


def close(a: float, b: float, scale: float | None = None, rtol: float = SUM_RTOL) -> bool:
    """|a - b| within ``rtol`` of ``scale`` (the absolute sum behind b; b itself for non-negative terms)."""
    return abs(a - b) <= rtol * (abs(b) if scale is None else scale)


def assert_cppo_metrics_match(one: dict, many: dict, case: str, layout: str) -> None:
    """Every ``actor/cppo_*`` metric of a multi-rank run within ``SUM_RTOL`` of the one-rank run's (they are
    means, shares or maxima of non-negative per-token values), over a batch that masks tokens."""
    assert one["actor/cppo_masked_frac"] > 0.05  # the comparison covers masked tokens
    if case == "topk_tv":
        assert one["actor/cppo_topk_coverage"] == 1.0
    assert set(many) == set(one)
    cppo = [k for k in one if k.startswith("actor/cppo_")]
    assert len(cppo) >= 10
    wrong = {k: (many[k], one[k]) for k in cppo if not close(many[k], one[k])}
    assert not wrong, f"{layout} CPPO metrics differ from one rank: {wrong}"


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def recorded_batch(record: dict, case: str):
    """The v1 trainer's actor batch (no-padding TensorDict) of the recorded rollout, with its advantages."""
    import numpy as np
    from tensordict import TensorDict
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from verl_cppo.advantage.exclusion import capture_exclusions

    rows = record["rows"]
    resp_lens = [len(r["response"]) for r in rows]
    width = max(resp_lens)
    scores = torch.zeros(len(rows), width)  # [B, R]: the outcome score on the last response token
    mask = torch.zeros(len(rows), width)  # [B, R]
    for b, n in enumerate(resp_lens):
        mask[b, :n] = 1.0
        scores[b, n - 1] = rows[b]["score"]
    uid = np.array([str(r["group"]) for r in rows], dtype=object)
    with capture_exclusions() as captured:
        adv, _ = get_adv_estimator_fn("cppo_grpo")(token_level_rewards=scores, response_mask=mask, index=uid)
    fields = {
        "input_ids": _nested([torch.tensor(r["prompt"] + r["response"]) for r in rows]),
        "position_ids": _nested([torch.arange(len(r["prompt"]) + len(r["response"])) for r in rows]),
        "prompts": _nested([torch.tensor(r["prompt"]) for r in rows]),
        "responses": _nested([torch.tensor(r["response"]) for r in rows]),
        "response_mask": _nested([torch.ones(n, dtype=torch.long) for n in resp_lens]),
        "loss_mask": _nested([torch.ones(n, dtype=torch.long) for n in resp_lens]),
        "rollout_log_probs": _nested([torch.tensor(r["rollout_log_probs"]) for r in rows]),
        "old_log_probs": _nested([torch.tensor(r["rollout_log_probs"]) for r in rows]),
        "advantages": _nested([adv[b, :n] for b, n in enumerate(resp_lens)]),
    }
    if case == "topk_tv":
        fields["rollout_topk_ids"] = _nested([torch.tensor(r["topk_ids"], dtype=torch.int32) for r in rows])
        fields["rollout_topk_log_probs"] = _nested([torch.tensor(r["topk_log_probs"]) for r in rows])
    if case == "cppo_grpo":
        fields["cppo_grpo_keep"] = captured[-1].keep.clone()  # [B] bool, as the trainer hook stores it
    data = TensorDict(fields, batch_size=[len(rows)])
    return data, captured[-1]


def planted_loss(loss_fn, plant: str | None):
    """The loss with a deliberate count error in front of it (mutation check), or the loss itself."""
    if plant is None:
        return loss_fn
    from verl.utils import tensordict_utils as tu

    def wrong_count(config, model_output=None, data=None, dp_group=None, **hook):  # verl calls with keywords
        if "student_logits" in hook:  # the Top-K engine hook's logits call: no counts involved
            return loss_fn(config=config, model_output=model_output, data=data, dp_group=dp_group, **hook)
        if plant == "dp_size":
            tu.assign_non_tensor(data, dp_size=1)
        elif plant == "tokens":
            tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].values().sum()))
        else:
            raise ValueError(f"--plant must be dp_size or tokens, got {plant!r}")
        return loss_fn(config=config, model_output=model_output, data=data, dp_group=dp_group)

    return wrong_count


def assign_update_fields(data, case: str) -> None:
    """The v1 trainer's ``_update_actor`` fields on the batch: one mini-batch = the whole recorded batch, two
    epochs, no shuffle; the Top-K case asks the engine for pi's logits (``distillation_use_topk``)."""
    from verl.utils import tensordict_utils as tu

    batch = data.shape[0]
    tu.assign_non_tensor(
        data,
        calculate_entropy=False,
        distillation_use_topk=case == "topk_tv",
        distillation_only=False,
        global_batch_size=batch,
        mini_batch_size=batch,
        epochs=EPOCHS,
        seed=42,
        dataloader_kwargs={"shuffle": False},
        compute_loss=True,
        temperature=1.0,
    )  # fmt: skip


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it in the same order), as float32."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().float().clone()


def record_optimizer_steps(engine) -> list[dict]:
    """Record every optimizer step of ``engine``: the full parameters before and after it, the full gradients it
    applies (after verl's clipping) and its hyper-parameters, each keyed by the module's parameter names.

    The equivalence test compares the gradients across layouts (they are sums) and checks each layout's update
    against a float64 replay of the optimizer rule, rather than comparing weights after AdamW steps, where
    g / sqrt(v) turns a rounding-level gradient entry into an update of up to ~lr. The test's replay is of
    ``torch.optim.AdamW``; any other optimizer is refused here, where the assumption is made.
    """
    optimizer = engine.optimizer
    if type(optimizer) is not torch.optim.AdamW:
        raise TypeError(f"the update replay assumes torch.optim.AdamW, verl built {type(optimizer).__name__}")
    names = {id(p): name for name, p in engine.module.named_parameters()}
    steps: list[dict] = []

    def parameters():
        return [(names[id(p)], p, group) for group in optimizer.param_groups for p in group["params"]]

    def before(opt, args, kwargs):
        record = {"grads": {}, "before": {}, "hyper": {}}
        for name, p, group in parameters():
            if group["amsgrad"] or group["maximize"]:
                raise ValueError(f"the update replay assumes amsgrad=maximize=False, group of {name}: {group}")
            record["grads"][name] = _full(p.grad)
            record["before"][name] = _full(p)
            record["hyper"][name] = {k: float(group[k]) for k in ("lr", "eps", "weight_decay")}
            record["hyper"][name]["betas"] = tuple(float(b) for b in group["betas"])
        steps.append(record)

    def after(opt, args, kwargs):
        steps[-1]["after"] = {name: _full(p) for name, p, _ in parameters()}

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return steps


def run_case(case: str, record: dict, model_dir: str, sp: int, plant: str | None, rank: int, world: int):
    """One actor update of ``case`` through a fresh ``TrainingWorker``; rank 0 returns (result, optimizer steps)."""
    from verl.single_controller.base.decorator import _split_args_kwargs_data_proto
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.workers.config import (
        FSDPActorConfig,
        FSDPEngineConfig,
        FSDPOptimizerConfig,
        HFModelConfig,
    )
    from verl.workers.utils.losses import ppo_loss

    from tests.support.verl_inputs import training_worker
    from verl_cppo.config import CPPOConfig, CPPOPolicyLossConfig
    from verl_cppo.testing.cpu_ulysses import ATTN_IMPLEMENTATION
    from verl_cppo.topk.engine_hook import ppo_loss_with_topk

    data, exclusion = recorded_batch(record, case)
    batch = data.shape[0]
    model_config = HFModelConfig(
        path=model_dir, use_remove_padding=True, enable_gradient_checkpointing=False,
        override_config={"attn_implementation": ATTN_IMPLEMENTATION},
    )  # fmt: skip
    engine_config = FSDPEngineConfig(
        strategy="fsdp2", model_dtype="fp32", use_torch_compile=False, ulysses_sequence_parallel_size=sp,
        use_dynamic_bsz=False,  # fixed micro-batches: the same rows per micro-batch on every layout
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        micro_batch_size_per_gpu=MICRO_BATCH, infer_micro_batch_size_per_gpu=MICRO_BATCH,
        max_token_len_per_gpu=1024, infer_max_token_len_per_gpu=1024,
    )  # fmt: skip
    optim_config = FSDPOptimizerConfig(lr=5e-2, total_training_steps=10, weight_decay=0.0, clip_grad=1e6)
    divergence = "topk_tv" if case == "topk_tv" else "binary_tv"
    cppo = CPPOConfig(divergence=divergence, topk=record["k"], delta=0.05, delta_b=0.01)
    agg = "seq-mean-token-mean" if case == "cppo_grpo" else "token-mean"
    actor_config = FSDPActorConfig(
        strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=batch // 4, ppo_micro_batch_size_per_gpu=MICRO_BATCH,
        use_torch_compile=False, fsdp_config=engine_config, optim=optim_config, loss_agg_mode=agg,
        ulysses_sequence_parallel_size=sp,
        policy_loss=CPPOPolicyLossConfig(loss_mode="cppo", cppo=cppo),
    )  # fmt: skip
    worker = training_worker(model_config, engine_config, optim_config, actor_config)
    optimizer_steps = record_optimizer_steps(worker.engine)
    loss_fn = ppo_loss_with_topk if case == "topk_tv" else ppo_loss
    seen: list[dict] = []  # the global counts verl hands the loss, per micro-batch

    def observed(config, model_output=None, data=None, dp_group=None, **hook):
        if "student_logits" not in hook:
            seen.append({k: data[k] for k in ("dp_size", "batch_num_tokens", "global_batch_size")})
        return loss_fn(config=config, model_output=model_output, data=data, dp_group=dp_group, **hook)

    worker.set_loss_fn(partial(planted_loss(observed, plant), config=actor_config))

    assign_update_fields(data, case)
    dp_size, dp_rank = worker.engine.get_data_parallel_size(), worker.engine.get_data_parallel_rank()
    (chunks,), _ = _split_args_kwargs_data_proto(dp_size, data)
    local = chunks[dp_rank].clone().unlock_()  # what the Ray call delivers: this rank's own unlocked copy
    output = worker.train_mini_batch(local)

    gathered: list = [None] * world
    dist.all_gather_object(gathered, seen)
    if rank != 0:
        return None, None
    raw = dict(tu.get(output, "metrics"))
    steps = {key: [float(v) for v in raw[key]] for key in ("loss", "grad_norm")}  # one value per optimizer step
    metrics = reduce_metrics(raw)
    result = {
        "layout": {"world": world, "sp": sp, "dp": dp_size},
        "steps": steps,
        "metrics": {k: float(v) for k, v in metrics.items() if not k.startswith(("perf/", "mfu"))},
        "counts": gathered,  # per rank, per micro-batch: what verl handed the loss
        "estimator_excluded": int((~exclusion.keep).sum()),
    }
    return result, optimizer_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("store")
    parser.add_argument("cases", help="comma-separated: cppo (binary TV), topk_tv, cppo_grpo")
    parser.add_argument("sp", type=int)
    parser.add_argument("--plant", choices=["dp_size", "tokens"], default=None)
    parser.add_argument("--record", default=RECORD)
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip  (verl's initialize_global_process_group_ray then finds the group and keeps it)

    import verl  # noqa: F401  (VERL_USE_EXTERNAL_MODULES=verl_cppo.testing.register: the CPU platform)

    from tests.support.record_rollout import weights_checksum
    from verl_cppo.testing import tiny_task

    with open(args.record) as f:
        record = json.load(f)
    model = tiny_task.build_model(seed=record["model"]["seed"], head_dim=record["model"]["head_dim"])
    checksum = weights_checksum(model)
    # the same seed gives the same weights up to the init's float32 arithmetic on this CPU (a few roundings,
    # <= 8 u |w| each: u = 2^-24) and the float64 sum's order; 2x margin. Another seed or shape differs by ~sum|w|.
    if abs(checksum - record["model"]["weights_abs_sum"]) > 16 * 2.0**-24 * record["model"]["weights_abs_sum"]:
        raise RuntimeError(f"the rebuilt model differs from the recorded one: sum|w| {checksum} vs {record['model']}")
    model_dir = os.path.join(tempfile.mkdtemp(prefix=f"multirank{rank}_"), "model")
    model.save_pretrained(model_dir)
    tiny_task.build_tokenizer().save_pretrained(model_dir)

    results, steps = {}, {}
    for case in args.cases.split(","):
        results[case], steps[case] = run_case(case, record, model_dir, args.sp, args.plant, rank, world)
    if rank == 0:
        torch.save({"results": results, "optimizer_steps": steps}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
