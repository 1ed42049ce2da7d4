"""GPU check: Transformer Engine's attention equals the CPU platform's context-parallel attention (THD, GQA, CP).

The CPU equivalence (tests/e2e/test_megatron_equivalence.py) replaces megatron's TE core attention by
``verl_cppo.testing.cp_attention.ContextParallelCoreAttention`` (an all-gather of K / V and a masked SDPA). What it
proves about verl's Megatron engine holds on GPUs only if TE's ``TEDotProductAttention`` computes the same function
on the same inputs: THD packing with verl's zig-zag CP split (``preprocess_thd_engine``), padded ``cu_seqlens``,
grouped-query heads, and (with CP > 1) TE's own K / V exchange. This script builds both with one megatron
``TransformerConfig`` and compares outputs and q / k / v gradients on every rank, in bf16 (TE's flash and fused
backends need it) against the CPU module in float32 on the same (bf16-rounded) inputs.

Tolerance: inputs are N(0, 1), bf16 keeps 8 significant bits (u = 2^-9); an output is a convex combination of V
rows, so TE's bf16 arithmetic moves it by a few u times max |V| (~4): 2^-4 absolute on outputs, and 2^-4 of the
largest gradient entry on gradients; a wrong mask, a wrong zig-zag chunk or a lost K / V shard moves outputs by
O(1).

Needs CUDA, transformer-engine and megatron-core (verl's ``megatron`` extra); not runnable on the CPU machines,
not run by the project's CPU CI. One GPU checks CP = 1 (THD, padded cu_seqlens, GQA); N GPUs check CP = N:

    python -m benchmarks.gpu_megatron_attention_check                          # 1 GPU
    torchrun --nproc_per_node 2 -m benchmarks.gpu_megatron_attention_check     # CP = 2 (TE's p2p exchange)

It prints ``RESULT`` lines (benchmarks/gpu_checks.sh collects them) and exits 1 on a mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

HEADS, GROUPS, DIM = 8, 2, 64
LENGTHS = [517, 1024, 3, 260]  # THD sequences, padded by verl to multiples of 2 cp
ATOL = 2.0**-4


def _config(cp: int, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=DIM,
        attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=cp, bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )  # fmt: skip


def main() -> int:
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from verl.models.mcore.util import preprocess_thd_engine

    from verl_cppo.testing.cp_attention import ContextParallelCoreAttention, zigzag_positions

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)

    gen = torch.Generator().manual_seed(0)
    rows = {
        name: [torch.randn(n, heads, DIM, generator=gen) for n in LENGTHS]
        for name, heads in (("q", HEADS), ("k", GROUPS), ("v", GROUPS), ("w", HEADS))
    }
    shards, params = {}, None
    for name, values in rows.items():  # verl's own zig-zag THD split of the same rows
        nested = torch.nested.as_nested_tensor([v.bfloat16().cuda() for v in values], layout=torch.jagged)
        local, params, _ = preprocess_thd_engine(nested, pre_process=True)
        shards[name] = local.squeeze(0)  # [T_local, heads, D]
    valid = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    params.cu_seqlens_q = params.cu_seqlens_kv = valid  # TE's meaning: valid lengths; the padded ones lay out
    params.max_seqlen_q = params.max_seqlen_kv = int(torch.diff(params.cu_seqlens_q_padded).max())

    results = {}
    for label, module, dtype in (
        ("te", TEDotProductAttention(_config(world, torch.bfloat16), 1, AttnMaskType.padding_causal, "self"),
         torch.bfloat16),
        ("cpu_platform", ContextParallelCoreAttention(_config(world, torch.float32), 1, AttnMaskType.causal, "self"),
         torch.float32),
    ):  # fmt: skip
        q, k, v = (shards[n].to(dtype).clone().requires_grad_(True) for n in ("q", "k", "v"))
        out = module(q, k, v, None, packed_seq_params=params).float().reshape(shards["w"].shape)  # [T_local, H, D]
        (out * shards["w"].float()).sum().backward()
        results[label] = (out.detach(), [x.grad.float() for x in (q, k, v)])

    padded = torch.diff(params.cu_seqlens_q_padded).cpu()
    seq, pos = zigzag_positions(padded, parallel_state.get_context_parallel_rank(), world)
    real = (pos < torch.tensor(LENGTHS)[seq]).cuda()  # [T_local] tokens of the sequences, not padding
    out_diff = float((results["te"][0] - results["cpu_platform"][0])[real].abs().max())
    grad_diff = max(
        float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
        for a, b in zip(results["te"][1], results["cpu_platform"][1])
    )
    ok = out_diff <= ATOL and grad_diff <= ATOL
    print(f"RESULT rank={rank} cp={world} out_max_abs={out_diff:.3e} grad_max_rel={grad_diff:.3e} ok={int(ok)}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
