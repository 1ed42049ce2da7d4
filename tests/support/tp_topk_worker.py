"""Rank body of the tensor-parallel test of topk_divergence (tests/core/test_topk_divergence.py), run by spawn.

It imports ``verl_cppo.kernels`` (over ``verl_cppo.core``) without running ``verl_cppo/__init__.py``: that file
imports verl to register the loss, 4-5 s of CPU per rank, while the Top-K math needs only torch (the layers
keep it verl-free).
"""

from __future__ import annotations

import os
import sys
import types
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tests.support.topk_reference import random_topk_case

TP_CASE = {"n": 24, "v": 151, "k": 9}
SPLITS = {2: [0, 70, 151], 4: [0, 40, 41, 120, 151]}  # uneven vocab shards, one of a single column
KINDS = ("tv", "kl")
BAD_ID = (5, 1)  # mu_topk_ids[5, 1] is set to V, an id no shard holds


def tp_case():
    logits, sampled, ids, lps, lp_s = random_topk_case(torch.Generator().manual_seed(7), **TP_CASE)
    logits[::3, 140:] = float("-inf")  # the last 4-way shard (120..151) partly masked, like a padded vocab
    logits[1::6, 120:] = float("-inf")  # ... and entirely -inf in some rows
    return logits, sampled, ids, lps, lp_s


def _topk_divergence_without_verl():
    if "verl_cppo" not in sys.modules:
        package = types.ModuleType("verl_cppo")
        package.__path__ = [str(Path(__file__).resolve().parents[2] / "verl_cppo")]
        sys.modules["verl_cppo"] = package
    from verl_cppo.kernels import topk_divergence

    return topk_divergence


def tp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Computes D for both splits (ranks 0-1 as a 2-rank group, all 4) and the bad-id error; saves them."""
    topk_divergence = _topk_divergence_without_verl()
    torch.set_num_threads(1)
    timeout = timedelta(seconds=30)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    pair = dist.new_group([0, 1], timeout=timeout)
    logits, sampled, ids, lps, lp_s = tp_case()
    bad = ids.clone()
    bad[BAD_ID] = TP_CASE["v"]
    results = {}
    for size, group in ((2, pair), (4, dist.group.WORLD)):
        if rank >= size:
            continue
        lo, hi = SPLITS[size][rank], SPLITS[size][rank + 1]
        shard = {"tp_group": group, "vocab_start_index": lo, "mu_sampled_logprobs": lp_s}
        for kind in KINDS:
            results[(size, kind)] = topk_divergence(logits[:, lo:hi], sampled, ids, lps, kind, **shard)
        try:
            topk_divergence(logits[:, lo:hi], sampled, bad, lps, "tv", **shard)
        except ValueError as e:
            results[(size, "error")] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
