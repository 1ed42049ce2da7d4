"""One rank of a CPPO actor update through verl's Megatron engine, on the CPU test platform (gloo).

Run by tests/e2e/test_megatron_equivalence.py as TP x CP processes (env RANK / WORLD_SIZE, CPU switch on;
``model.external_lib=verl_cppo.megatron_shard_local`` as the Megatron example sets it). verl's ``TrainingWorker`` builds
``MegatronEngineWithLMHead`` (vanilla mbridge, THD packing, distributed optimizer, float32; the CPU shims of
``verl_cppo.testing.cpu_megatron``) around the tiny Qwen3 the rollout was recorded with, and trains on the
recorded vLLM rollout exactly as tests/support/multirank_update.py does for FSDP (same batch, same fields, two
epochs of one mini-batch, micro-batches of 4 responses): binary TV, Top-K TV (the engine's logits hook) and
``cppo_grpo`` with its excluded group.

Per case, rank 0 writes: the loss and grad norm of each optimizer step, the metrics reduced the trainer's way,
the global counts every micro-batch of every rank handed the loss, how many micro-batches each rank scored with
the shard-local loss, and per optimizer step the full gradient the optimizer used, the weights before and after
it (HF names, merged over TP by mbridge's own export) and the optimizer's hyper-parameters (param_groups).

``--comm-out FILE`` (binary-TV case) logs, per training micro-batch and rank, the bytes this rank sends in the
collectives of the loss path: verl's CP all-gather of per-token outputs (``postprocess_thd_engine``) and the
shard-local loss's exchanges (``shard_local_ppo_loss``), with the micro-batch's local token count; ``--gathered``
leaves the shard-local hook out (verl's own path). benchmarks/megatron_cp_comm_worker.py reads them.

``--plant`` makes a deliberate error the equivalence test must catch: ``no_carry`` (the prefix scan per shard,
without the carry between shards), ``contiguous`` (the zig-zag THD layout read as contiguous blocks),
``dp_size`` (the DP x CP group size handed to the loss as its DP size).

    python -m tests.support.megatron_update OUT STORE CASES TP CP [--plant no_carry|contiguous|dp_size]
        [--comm-out FILE] [--gathered]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from tests.support.multirank_update import MICRO_BATCH, RECORD, assign_update_fields, recorded_batch

COLLECTIVE_TIMEOUT_S = 300  # 9 processes share 2 cores in the test: a rank may wait long for the others
TEST_HOOK = "megatron_equivalence_probe"
PLANTS = ("no_carry", "contiguous", "dp_size")


def _gather_reduced_grads(engine) -> None:
    """With the distributed optimizer each DP x CP rank holds only its shard of the reduced gradient buffer (the
    rest is the unreduced local gradient); all_gather the shards so every ``main_grad`` is the full reduced one.
    The optimizer reads only its own shard, so this changes nothing it uses."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in engine.module:
        for buffer in chunk.buffers:
            for bucket in buffer.buckets:
                group = (
                    getattr(bucket, "intra_distributed_optimizer_instance_group", None) or buffer.data_parallel_group
                )
                shards = shard_buffer(bucket.grad_data, group.size())
                mine = shards[group.rank()].clone()
                dist.all_gather(list(shards), mine, group=group)


def _export(engine, grads: bool = False) -> dict[str, torch.Tensor]:
    """HF-named full tensors through verl's own export (mbridge merges TP); ``grads``: the ``main_grad``s."""
    params = [p for chunk in engine.module for p in chunk.parameters()]
    saved = [p.data for p in params]
    if grads:
        for p in params:
            p.data = p.main_grad
    try:
        tensors, _ = engine.get_per_tensor_param()
        out = {name: t.detach().double().clone() for name, t in tensors}
    finally:
        for p, data in zip(params, saved):
            p.data = data
    return out


def _probe(records: dict):
    """Test-only wrappers (verl_cppo.hooks, own hook name) recording what the engine does; plants applied here."""
    from verl.utils import tensordict_utils as tu

    from verl_cppo import hooks

    def optimizer_step(original):
        @functools.wraps(original)
        def step(self):
            _gather_reduced_grads(self)
            group = self.optimizer.param_groups[0]
            hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            records["steps"].append(
                {"grads": _export(self, grads=True), "before": _export(self), "hyper": hyper,
                 "adam": type(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer)}
            )  # fmt: skip
            grad_norm = original(self)
            records["steps"][-1]["after"] = _export(self)
            return grad_norm

        return step

    def postprocess(original):
        @functools.wraps(original)
        def postprocess_micro_batch_func(self, output, data, forward_only, loss_function, local_cp_size=None):
            if not forward_only:
                if records["plant"] == "dp_size":  # the DP x CP group size instead of the DP size
                    from megatron.core import parallel_state as mpu

                    tu.assign_non_tensor(data, dp_size=mpu.get_data_parallel_world_size(with_context_parallel=True))
                records["counts"].append({k: data[k] for k in ("dp_size", "batch_num_tokens", "global_batch_size")})
            return original(self, output, data, forward_only, loss_function, local_cp_size=local_cp_size)

        return postprocess_micro_batch_func

    def shard_local(original):
        @functools.wraps(original)
        def shard_local_ppo_loss(*args, **kwargs):
            records["shard_local_calls"] += 1
            return original(*args, **kwargs)

        return shard_local_ppo_loss

    engine = "verl.workers.engine.megatron.transformer_impl"
    hooks.wrap(engine, "MegatronEngine.optimizer_step", optimizer_step, name=TEST_HOOK, now=True)
    hooks.wrap(engine, "MegatronEngineWithLMHead.postprocess_micro_batch_func", postprocess, name=TEST_HOOK)
    hooks.wrap("verl_cppo.sharding.megatron", "shard_local_ppo_loss", shard_local, name=TEST_HOOK, now=True)
    if records["plant"] == "no_carry":
        hooks.wrap("verl_cppo.sharding.context", "shard_prefix_scan", _no_carry, name=TEST_HOOK, now=True)
    if records["plant"] == "contiguous":
        hooks.wrap("verl_cppo.sharding.megatron", "zigzag_thd_layout", _contiguous, name=TEST_HOOK, now=True)


def _comm_probe(log: list) -> None:
    """Count the bytes this rank sends in all_gather / all_reduce while verl's per-token output post-processing
    (``postprocess_thd_engine`` as model_forward calls it) or the shard-local loss runs; other collectives (the
    attention's K / V exchange, the optimizer's) are not counted."""
    import contextvars

    from verl_cppo import hooks

    phase: contextvars.ContextVar = contextvars.ContextVar("megatron_comm_phase", default=None)

    def counting(original):
        @functools.wraps(original)
        def collective(tensor_or_list, tensor=None, *args, **kwargs):
            current = phase.get()
            if current is not None:
                sent = tensor if isinstance(tensor, torch.Tensor) else tensor_or_list
                log[-1][current] += sent.numel() * sent.element_size()
            return (
                original(tensor_or_list, tensor, *args, **kwargs)
                if tensor is not None
                else original(tensor_or_list, *args, **kwargs)
            )

        return collective

    def in_phase(name):
        def make(original):
            @functools.wraps(original)
            def wrapped(*args, **kwargs):
                if name == "gathered":
                    log.append({"gathered": 0, "shard_local": 0, "local_tokens": int(args[0].shape[-1])})
                token = phase.set(name)
                try:
                    return original(*args, **kwargs)
                finally:
                    phase.reset(token)

            return wrapped

        return make

    hooks.wrap("torch.distributed", "all_gather", counting, name=TEST_HOOK, now=True)
    hooks.wrap("torch.distributed", "all_reduce", counting, name=TEST_HOOK, now=True)
    hooks.wrap("verl.models.mcore.model_forward", "postprocess_thd_engine", in_phase("gathered"), name=TEST_HOOK)
    hooks.wrap("verl_cppo.sharding.megatron", "shard_local_ppo_loss", in_phase("shard_local"), name=TEST_HOOK)


def _no_carry(original):
    """Planted error: each rank's prefix sums restart at every piece it holds (no carry from earlier shards)."""
    from verl_cppo.sharding.scan import _segmented_exclusive_cumsum

    @functools.wraps(original)
    def shard_prefix_scan(div, valid, in_mask, layout, group=None, **kwargs):
        scan = original(div, valid, in_mask, layout, group, **kwargs)
        inside = layout.cell >= 0
        wd = torch.where(scan.valid, scan.weight * div, 0.0)
        s_excl = torch.where(inside, _segmented_exclusive_cumsum(wd, layout.cell), 0.0)
        w_excl = torch.where(inside, _segmented_exclusive_cumsum(scan.weight, layout.cell), 0.0)
        return dataclasses.replace(scan, s_excl=s_excl, w_excl=w_excl)

    return shard_prefix_scan


def _contiguous(original):
    """Planted error: rank r's local block of each sequence read as the contiguous columns [r S/cp, (r+1) S/cp)."""
    from verl_cppo.sharding.layout import _as_long, _locate

    @functools.wraps(original)
    def zigzag_thd_layout(cu_seqlens_padded, response_start, response_len, rank, cp_size, *, width=None):
        lens = _as_long(cu_seqlens_padded).diff()  # [B]
        local = lens // cp_size  # [B]
        seq = torch.repeat_interleave(torch.arange(lens.numel()), local)  # [N]
        j = torch.arange(int(local.sum())) - (torch.cumsum(local, 0) - local)[seq]  # [N]
        col = rank * local[seq] + j
        piece = 2 * rank + (j >= local[seq] // 2).long()
        rank_pieces = torch.arange(2 * cp_size).view(cp_size, 2)
        return _locate(seq, col, piece, response_start, response_len, rank_pieces, width)

    return zigzag_thd_layout


def run_case(
    case: str, record: dict, model_dir: str, tp: int, cp: int, records: dict, rank: int, world: int, gathered: bool
):
    """One actor update of ``case`` through a fresh ``TrainingWorker``; rank 0 returns its result."""
    from megatron.core import parallel_state as mpu
    from verl.single_controller.base.decorator import _split_args_kwargs_data_proto
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.workers.config import HFModelConfig, McoreActorConfig, McoreEngineConfig, McoreOptimizerConfig
    from verl.workers.utils.losses import ppo_loss

    from tests.support.verl_inputs import training_worker
    from verl_cppo.config import CPPOConfig, CPPOPolicyLossConfig
    from verl_cppo.testing.cpu_megatron import OVERRIDE_TRANSFORMER_CONFIG, PROVEN_ENGINE, PROVEN_EXTERNAL_LIB
    from verl_cppo.topk.engine_hook import ppo_loss_with_topk

    data, exclusion = recorded_batch(record, case)
    batch = data.shape[0]
    model_config = HFModelConfig(
        path=model_dir, use_remove_padding=True, enable_gradient_checkpointing=False,
        external_lib=None if gathered else PROVEN_EXTERNAL_LIB,  # imported here, as in every actor worker
    )  # fmt: skip
    engine_config = McoreEngineConfig(
        **PROVEN_ENGINE, dtype="float32", tensor_model_parallel_size=tp, context_parallel_size=cp,
        sequence_parallel=False, use_dynamic_bsz=False,  # fixed micro-batches: the same rows on every layout
        micro_batch_size_per_gpu=MICRO_BATCH, infer_micro_batch_size_per_gpu=MICRO_BATCH,
        max_token_len_per_gpu=1024, infer_max_token_len_per_gpu=1024,
        override_transformer_config=dict(OVERRIDE_TRANSFORMER_CONFIG), seed=42,
    )  # fmt: skip
    optim_config = McoreOptimizerConfig(
        lr=5e-2, total_training_steps=10, weight_decay=0.0, clip_grad=1e6, lr_warmup_steps=0,
        lr_decay_style="constant",
    )  # fmt: skip
    divergence = "topk_tv" if case == "topk_tv" else "binary_tv"
    cppo = CPPOConfig(divergence=divergence, topk=record["k"], delta=0.05, delta_b=0.01)
    agg = "seq-mean-token-mean" if case == "cppo_grpo" else "token-mean"
    actor_config = McoreActorConfig(
        strategy="megatron", rollout_n=4, ppo_mini_batch_size=batch // 4, ppo_micro_batch_size_per_gpu=MICRO_BATCH,
        megatron=engine_config, optim=optim_config, loss_agg_mode=agg,
        policy_loss=CPPOPolicyLossConfig(loss_mode="cppo", cppo=cppo),
    )  # fmt: skip
    worker = training_worker(model_config, engine_config, optim_config, actor_config)
    worker.set_loss_fn(partial(ppo_loss_with_topk if case == "topk_tv" else ppo_loss, config=actor_config))
    assign_update_fields(data, case)  # as tests/support/multirank_update.py sends them
    dp_size, dp_rank = worker.engine.get_data_parallel_size(), worker.engine.get_data_parallel_rank()
    (chunks,), _ = _split_args_kwargs_data_proto(dp_size, data)
    local = chunks[dp_rank].clone().unlock_()
    records.update(counts=[], steps=[], shard_local_calls=0)
    output = worker.train_mini_batch(local)

    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, {"counts": records["counts"], "shard_local": records["shard_local_calls"]})
    if rank != 0:
        return None
    raw = dict(tu.get(output, "metrics"))
    metrics = reduce_metrics(raw)
    adam = records["steps"][0]["adam"]
    return {
        "layout": {
            "world": world,
            "tp": mpu.get_tensor_model_parallel_world_size(),
            "cp": mpu.get_context_parallel_world_size(),
            "dp": dp_size,
        },
        "steps": {key: [float(v) for v in np.atleast_1d(raw[key])] for key in ("loss", "grad_norm")},
        "raw_keys": sorted(raw),
        "metrics": {k: float(v) for k, v in metrics.items() if not k.startswith(("perf/", "mfu"))},
        "counts": [g["counts"] for g in per_rank],
        "shard_local_calls": [g["shard_local"] for g in per_rank],
        "estimator_excluded": int((~exclusion.keep).sum()),
        "optimizer": f"{adam.__module__}.{adam.__qualname__}",
        "updates": [{k: v for k, v in s.items() if k != "adam"} for s in records["steps"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("store")
    parser.add_argument("cases", help="comma-separated: cppo (binary TV), topk_tv, cppo_grpo")
    parser.add_argument("tp", type=int)
    parser.add_argument("cp", type=int)
    parser.add_argument("--plant", choices=PLANTS, default=None)
    parser.add_argument("--record", default=RECORD)
    parser.add_argument("--comm-out", default=None)
    parser.add_argument("--gathered", action="store_true", help="uninstall the shard-local hook (verl's path)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", init_method=f"file://{args.store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip

    import verl  # noqa: F401  (VERL_USE_EXTERNAL_MODULES=verl_cppo.testing.register: the CPU platform)

    from tests.support.record_rollout import weights_checksum
    from verl_cppo.testing import cpu_megatron, tiny_task

    records = {"plant": args.plant}
    if not args.gathered:  # the module model.external_lib names; imported first so the probes below wrap it
        import verl_cppo.megatron_shard_local  # noqa: F401
    comm: list = []
    if args.comm_out:
        _comm_probe(comm)
    _probe(records)
    with open(args.record) as f:
        record = json.load(f)
    model = tiny_task.build_model(seed=record["model"]["seed"], head_dim=record["model"]["head_dim"])
    checksum = weights_checksum(model)
    if abs(checksum - record["model"]["weights_abs_sum"]) > 1e-3:
        raise RuntimeError(f"the rebuilt model differs from the recorded one: sum|w| {checksum} vs {record['model']}")
    model_dir = os.path.join(tempfile.mkdtemp(prefix=f"megatron{rank}_"), "model")
    model.save_pretrained(model_dir)
    tiny_task.build_tokenizer().save_pretrained(model_dir)

    results = {}
    for case in args.cases.split(","):
        results[case] = run_case(case, record, model_dir, args.tp, args.cp, records, rank, world, args.gathered)
    if args.comm_out:
        logs: list = [None] * world
        dist.all_gather_object(logs, comm)
        if rank == 0:
            with open(args.comm_out, "w") as f:
                json.dump({"tp": args.tp, "cp": args.cp, "gathered": args.gathered, "ranks": logs}, f)
    if rank == 0:
        results["_shims"] = cpu_megatron.installed()
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
