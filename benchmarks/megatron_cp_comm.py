"""Bytes per micro-batch: verl's CP all-gather of per-token outputs vs the shard-local CPPO loss.

verl 0.9.1's Megatron engine all-gathers every per-token output of the LM head (log-probs; entropy too when
``calculate_entropy``) over the CP group before the loss (``postprocess_thd_engine``). The shard-local path
(``verl_cppo.sharding.megatron``) skips it and exchanges per-response scalars instead (``verl_cppo.sharding.scan``).
This script builds micro-batches shaped like the paper's settings (packed to a per-GPU token budget, as
verl's dynamic batch size does), cuts them with verl's own ``preprocess_thd_engine`` on gloo ranks, and counts
the bytes every ``torch.distributed.all_gather`` moves on both paths (what one rank sends; it receives
cp - 1 times as much). CPU, gloo, megatron-core's parallel_state: a volume count, not a timing.

    python -m benchmarks.megatron_cp_comm [--cp 2 4 8] [--entropy] [--seed 0]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VERL_LOGGING_LEVEL", "ERROR")  # verl logs every CP padding of a sequence at WARN

import megatron.core.parallel_state as parallel_state
import torch
import torch.distributed as dist
from verl.models.mcore.util import postprocess_thd_engine, preprocess_thd_engine

from tests.support.distributed import run_ranks
from tests.support.verl_inputs import actor_config
from verl_cppo.loss import compute_policy_loss_cppo
from verl_cppo.sharding.context import ShardContext
from verl_cppo.sharding.layout import zigzag_thd_layout

# (name, prompt length range, response length range, tokens per micro-batch: ppo_max_token_len_per_gpu)
SETTINGS = [
    ("8k responses, 24k-token micro-batch", (100, 600), (500, 8192), 24576),
    ("16k responses, 32k-token micro-batch", (100, 600), (1000, 16384), 32768),
    ("short: 2k responses, 16k-token micro-batch", (100, 600), (100, 2048), 16384),
]


def micro_batch(gen, prompt_range, response_range, budget):
    """Responses packed until the token budget is full; synthetic log-probs with pi close to mu."""
    prompts, responses = [], []
    while True:
        p = int(torch.randint(*prompt_range, (1,), generator=gen))
        r = int(torch.randint(*response_range, (1,), generator=gen))
        if prompts and sum(prompts) + sum(responses) + p + r > budget:
            break
        prompts.append(p)
        responses.append(r)
    rows = []
    for p, r in zip(prompts, responses):
        confident = torch.rand(r, generator=gen) < 0.7  # most sampled tokens have mu close to 1
        log_mu = torch.where(confident, -1e-3 * torch.rand(r, generator=gen), torch.log(torch.rand(r, generator=gen)))
        log_pi = (log_mu + 0.05 * torch.randn(r, generator=gen)).clamp(max=0.0)
        adv = torch.full((r,), float(torch.randn(1, generator=gen).sign()))
        rows.append((p, r, log_mu, log_pi, adv))
    return rows


def _counting_all_gather(log):
    original = dist.all_gather

    def counting(tensor_list, tensor, *args, **kwargs):
        log.append(tensor.numel() * tensor.element_size())
        return original(tensor_list, tensor, *args, **kwargs)

    return counting, original


def _rank_body(rank, world, rows, entropy):
    parallel_state.initialize_model_parallel(context_parallel_size=world)

    def nested(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    # Per-token values over whole sequences (prompt + response), placed as verl's log-probs are: the value
    # predicting response token k sits at column prompt - 1 + k.
    seqs = []
    for p, r, _, log_pi, _ in rows:
        seq = torch.zeros(p + r)
        seq[p - 1 : p - 1 + r] = log_pi
        seqs.append(seq)
    full = nested(seqs)
    local, params, _ = preprocess_thd_engine(full, pre_process=True)  # verl's own zigzag split: [1, N_local]
    keys = 2 if entropy else 1
    gathered_log, shard_log = [], []

    counting, original = _counting_all_gather(gathered_log)
    dist.all_gather = counting
    try:
        for _ in range(keys):  # verl gathers each per-token output: log_probs (and entropy)
            postprocess_thd_engine(local, params, full, len(rows))
    finally:
        dist.all_gather = original

    prompts = torch.tensor([p for p, *_ in rows])
    resp = torch.tensor([r for _, r, *_ in rows])
    layout = zigzag_thd_layout(params.cu_seqlens_q_padded, prompts - 1, resp, rank, world)
    inside = layout.row >= 0
    row, col = layout.row.clamp(min=0), (layout.position - 1).clamp(min=0)

    def to_shard(i):  # the side inputs at this rank's tokens (no communication)
        padded = torch.nn.utils.rnn.pad_sequence([x[i] for x in rows], batch_first=True)
        return torch.where(inside, padded[row, col], 0.0)[None]

    old, adv = to_shard(2), to_shard(4)
    mask = inside[None]
    counting, original = _counting_all_gather(shard_log)
    dist.all_gather = counting
    try:
        ctx = ShardContext(layout, parallel_state.get_context_parallel_group())
        cfg = actor_config("seq-mean-token-sum-norm", cppo={}, loss_scale_factor=16384, engine="megatron")
        compute_policy_loss_cppo(
            old_log_prob=old,
            log_prob=local.clone(),
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=cfg.loss_agg_mode,
            config=cfg,
            shard=ctx,
        )
        if entropy:  # the entropy bonus, one more message (as sharding.megatron.shard_local_ppo_loss does)
            ctx.whole_losses([ctx.aggregate(local, mask, cfg.loss_agg_mode, {})])
    finally:
        dist.all_gather = original
    assert sum(shard_log) == ctx.stats.bytes_sent, (shard_log, ctx.stats.log)
    return {
        "local_tokens": local.shape[-1],
        "gathered": gathered_log,
        "shard": shard_log,
        "quantile_rounds": sum(tag == "quantile" for tag, _ in ctx.stats.log),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--entropy", action="store_true", help="also gather / reduce the entropy term")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"{'micro-batch':44s} {'cp':>3s} {'resp':>4s} {'tokens':>7s} | {'gathered: sent/rank':>20s} {'msgs':>4s} | "
        f"{'shard-local: sent/rank':>22s} {'msgs':>4s} {'rounds':>6s} | {'saved/rank (sent+recv)':>22s} {'ratio':>7s}"
    )
    for name, prompt_range, response_range, budget in SETTINGS:
        rows = micro_batch(torch.Generator().manual_seed(args.seed), prompt_range, response_range, budget)
        tokens = sum(p + r for p, r, *_ in rows)
        for cp in args.cp:
            results = run_ranks(_rank_body, cp, rows, args.entropy, time_limit_s=300)
            gathered = max(sum(r["gathered"]) for r in results)
            shard = max(sum(r["shard"]) for r in results)
            msgs_g = len(results[0]["gathered"])
            msgs_s = len(results[0]["shard"])
            saved = cp * (gathered - shard)  # sent + received (cp - 1 times the payload) per rank
            print(
                f"{name:44s} {cp:3d} {len(rows):4d} {tokens:7d} | {gathered:18,d} B {msgs_g:4d} | "
                f"{shard:20,d} B {msgs_s:4d} {results[0]['quantile_rounds']:6d} | {saved:20,d} B "
                f"{gathered / shard:6.0f}x"
            )


if __name__ == "__main__":
    main()
