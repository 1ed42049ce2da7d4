"""Multi-process (gloo) check of the engine hook under verl's sequence / vocab sharding; run by
tests/topk/test_engine_hook_dist.py as ``python -m tests.support.topk_dist_worker OUT`` (4 ranks, every mode in
one run).

Every rank builds the same micro-batch and pi logits, computes the unsharded D with the hook (FSDP layout, no
SP), then shards the logits the way the engine does, calls the hook on its shard and reassembles the result
with the engine's own gather:

  ulysses   SP=2 (two groups): logits sliced like the packed input ids (slice_input_tensor), gathered with verl's
            gather_outputs_and_unpad (FSDPEngine._gather_and_unpad_packed)
  tp        Megatron TP=2, THD: logits in preprocess_thd_engine's packed layout, this rank's vocab shard,
            gathered with postprocess_thd_engine
  cp        Megatron CP=2 (zig-zag), THD: this rank's sequence chunks, postprocess_thd_engine
  tp_cp     Megatron TP=2 x CP=2
  bshd      Megatron TP=2 x CP=2, BSHD: preprocess_bshd_engine / postprocess_bshd_engine

Rank 0 writes the max abs difference per mode to OUT, and its largest ratio to the float32 bound (twice
``tests.support.float32_bounds.topk_divergence_bound``: each D is within it of the exact value). Every rank
uses every collective's output.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state as mpu
from verl.models.mcore.util import (
    postprocess_bshd_engine,
    postprocess_thd_engine,
    preprocess_bshd_engine,
    preprocess_thd_engine,
)
from verl.utils.ulysses import gather_outputs_and_unpad, set_ulysses_sequence_parallel_group, slice_input_tensor

from tests.support.float32_bounds import topk_divergence_bound
from tests.support.topk_batches import topk_micro_batch
from tests.support.verl_inputs import actor_config
from verl_cppo.topk.engine_hook import TOPK_DIV_KEY, ppo_loss_with_topk

MODES = ("ulysses", "tp", "cp", "tp_cp", "bshd")
WORLD = 4


def _run(rank: int, world: int, out: str, rdv: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90)
    )
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(7)
    prompts, responses = [3, 5, 2, 4], [6, 3, 9, 1]  # odd total (33 tokens): SP pads, CP pads per sequence
    data, logits, _ = topk_micro_batch(gen, prompts, responses, vocab=24, k=4)
    logits = logits.float()
    sp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    results = {}
    for mode in MODES:
        for kind in ("tv", "kl"):
            cfg = actor_config(cppo={"divergence": f"topk_{kind}", "topk": 4})
            full = ppo_loss_with_topk(cfg, student_logits=logits[None], data=data)[TOPK_DIV_KEY].squeeze(0)  # [nnz]
            sp_group = sp_groups[rank // 2]
            sharded = _sharded(mode, sp_group, cfg, data, logits, TOPK_DIV_KEY, ppo_loss_with_topk)
            # both are float32 D of the same float32 logits, each within topk_divergence_bound of the exact D
            bound = 2 * topk_divergence_bound(logits, kind, full)  # [nnz]
            gap = (sharded - full).abs().double()  # [nnz]
            diff = torch.tensor([float(gap.max()), float((gap / bound).max())], dtype=torch.float64)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            results[f"{mode}/{kind}"], results[f"{mode}/{kind}_ratio"] = diff.tolist()
            results[f"{mode}/{kind}_nonzero"] = int((full != 0).sum())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def _sharded(mode, sp_group, cfg, data, logits, key, hook):
    offsets = data["input_ids"].offsets()
    if mode == "ulysses":
        set_ulysses_sequence_parallel_group(sp_group)
        try:
            nnz, sp = logits.shape[0], dist.get_world_size(sp_group)
            local = slice_input_tensor(logits[None], dim=1)  # (1, ceil(nnz/sp), V)
            div = hook(cfg, student_logits=local, data=data)[key].squeeze(0)
            pad = (sp - nnz % sp) % sp
            return gather_outputs_and_unpad(div, gather_dim=0, unpad_dim=0, padding_size=pad)
        finally:
            set_ulysses_sequence_parallel_group(None)

    tp, cp = {"tp": (2, 1), "cp": (1, 2), "tp_cp": (2, 2), "bshd": (2, 2)}[mode]
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        nested_logits = torch.nested.nested_tensor_from_jagged(logits, offsets=offsets)
        if mode == "bshd":
            padded, _, _ = preprocess_bshd_engine(nested_logits, pre_process=True)  # (B, S/cp, V), CP shard
            _, attention_mask, _ = preprocess_bshd_engine(data["input_ids"], pre_process=True)
            shard = padded.shape[-1] // tp
            tp_rank = mpu.get_tensor_model_parallel_rank()
            local = padded[..., tp_rank * shard : (tp_rank + 1) * shard]
            div = hook(cfg, student_logits=local, data=data, data_format="bshd")[key]  # (B, S/cp)
            return postprocess_bshd_engine(div, attention_mask).values()
        packed, _, _ = preprocess_thd_engine(nested_logits, pre_process=True)  # (1, rows, V), CP shard
        _, params_ids, _ = preprocess_thd_engine(data["input_ids"], pre_process=True)
        shard = packed.shape[-1] // tp
        tp_rank = mpu.get_tensor_model_parallel_rank()
        local = packed[..., tp_rank * shard : (tp_rank + 1) * shard]  # this rank's vocab shard
        div = hook(cfg, student_logits=local, data=data, data_format="thd")[key]  # (1, rows)
        nested = postprocess_thd_engine(div, params_ids, data["input_ids"], len(offsets) - 1, post_process=True)
        return nested.values()
    finally:
        mpu.destroy_model_parallel()


if __name__ == "__main__":
    out = sys.argv[1]
    rdv = out + ".rdv"
    if os.path.exists(rdv):
        os.remove(rdv)
    # fork after the imports above: the ranks share the imported verl / megatron-core instead of re-importing
    mp.start_processes(_run, args=(WORLD, out, rdv), nprocs=WORLD, join=True, start_method="fork")
