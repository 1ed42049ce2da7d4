"""GPU check of the Top-K divergence on the engine hook's packed micro-batch (run by benchmarks/gpu_checks.sh).

    python -m benchmarks.gpu_topk_check [--tokens 8192] [--vocab 151936] [--k 20] [--device cpu]

Builds one packed micro-batch (4 sequences, the first quarter of each its prompt) with mu's top-K and bf16 pi
logits on the device, and lays mu's inputs out over the packed rows as the hook does (response token t of a
sequence with P prompt tokens at row P-1+t; the other rows with no top-K ids and flag 0), here, independently of
the hook's own ``full_sequence_topk_inputs``. Then D on every row, for tv and kl:

  hook    ``ppo_loss_with_topk(config, student_logits=..., data=...)`` exactly as verl's FSDP engine calls it
          (CUDA tensors, nested ``TensorDict``); needs verl, and prints a SKIPPED line where verl is not installed
  kernel  ``verl_cppo.kernels.topk_divergence`` on the laid-out rows: the call the hook makes on one Ulysses rank

each compared with a float64 full-softmax reference on the same layout (in chunks). Prints the max errors, the
time of one call after a warm-up and its peak extra memory over the logits (on CPU: the rise of the process's
peak resident set, allocator noise included), and a ``RESULT`` line per call. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from verl_cppo import kernels

HAS_VERL = importlib.util.find_spec("verl") is not None
if HAS_VERL:  # the hook as verl's engine calls it
    from tensordict import TensorDict

    from tests.support.verl_inputs import actor_config
    from verl_cppo.topk.engine_hook import TOPK_DIV_KEY, ppo_loss_with_topk

GPU_IMPORTS = ("verl_cppo.kernels.topk_statistics",)
"""Modules the CUDA run imports inside functions (``kernels.topk_divergence()`` imports its Triton kernel's module
on its first CUDA call); benchmarks.check_imports imports them."""

N_SEQ = 4
MAX_ABS_ERR = 1e-3
"""D's tolerance: the kernel sums exp over V = 151,936 bf16 logits in float32 (relative error ~1e-7 a term, a
few 1e-5 over the row at worst), the reference in float64; D (tv in [0, 1], kl capped) moves far less than 1e-3."""


class PackedRows(NamedTuple):
    """mu's inputs over the packed rows of the micro-batch; rows off the responses: id 0, no top-K, flag 0."""

    sampled: torch.Tensor  # [N] the response token each row predicts
    ids: torch.Tensor  # [N, K] mu's top-K ids, -1 = none
    lps: torch.Tensor  # [N, K] mu's top-K log-probs
    mu_sampled: torch.Tensor  # [N] mu's log-prob of the sampled token
    is_response: torch.Tensor  # [N] bool


def build(tokens: int, vocab: int, k: int, device: str):
    """(logits [N, V] bf16, PackedRows, per-sequence lists for the hook's nested batch), N = tokens."""
    gen = torch.Generator(device=device).manual_seed(0)
    seq_len = tokens // N_SEQ
    prompt_len = seq_len // 4
    resp_len = seq_len - prompt_len
    nnz = N_SEQ * seq_len
    logits = torch.empty(nnz, vocab, dtype=torch.bfloat16, device=device)
    mu = torch.empty(nnz, vocab, dtype=torch.bfloat16, device=device)  # mu's log-probs
    for r0 in range(0, nnz, 512):  # chunks keep the set-up's own memory small
        x = 2.0 * torch.randn(min(512, nnz - r0), vocab, generator=gen, device=device)  # [c, V]
        logits[r0 : r0 + len(x)] = x.to(torch.bfloat16)
        noisy = x.to(torch.bfloat16).float() + 0.5 * torch.randn(x.shape, generator=gen, device=device)
        mu[r0 : r0 + len(x)] = noisy.log_softmax(-1).to(torch.bfloat16)
    rows = PackedRows(
        torch.zeros(nnz, dtype=torch.long, device=device),
        torch.full((nnz, k), -1, dtype=torch.long, device=device),
        torch.zeros(nnz, k, dtype=torch.float32, device=device),
        torch.zeros(nnz, dtype=torch.float32, device=device),
        torch.zeros(nnz, dtype=torch.bool, device=device),
    )
    seqs = {"input_ids": [], "responses": [], "rollout_log_probs": [], "topk_ids": [], "topk_lps": []}
    for b in range(N_SEQ):
        at = b * seq_len + prompt_len - 1 + torch.arange(resp_len, device=device)  # [R] rows predicting the response
        lp = mu[at].float()  # [R, V]
        resp = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(-1)  # [R]
        top = torch.topk(lp, k)
        mu_resp = lp.gather(-1, resp[:, None]).squeeze(-1)  # [R]
        rows.sampled[at], rows.ids[at], rows.lps[at], rows.mu_sampled[at], rows.is_response[at] = (
            resp,
            top.indices,
            top.values,
            mu_resp,
            True,
        )
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen, device=device)
        for key, value in zip(seqs, (torch.cat([prompt, resp]), resp, mu_resp, top.indices.int(), top.values)):
            seqs[key].append(value)
    return logits, rows, seqs


def nested_batch(seqs: dict, prompt_len: int):
    """The micro-batch as verl's engine hands it to the loss: a TensorDict of jagged nested tensors."""

    def nested(values):
        return torch.nested.as_nested_tensor(values, layout=torch.jagged)

    fields = {
        "input_ids": nested(seqs["input_ids"]),
        "prompts": nested([s[:prompt_len] for s in seqs["input_ids"]]),
        "responses": nested(seqs["responses"]),
        "rollout_log_probs": nested(seqs["rollout_log_probs"]),
        "rollout_topk_ids": nested(seqs["topk_ids"]),
        "rollout_topk_log_probs": nested(seqs["topk_lps"]),
    }
    return TensorDict(fields, batch_size=[N_SEQ])


def reference(rows: PackedRows, logits: torch.Tensor, kind: str, chunk: int = 512) -> torch.Tensor:
    """float64 D on every row (0 off the response rows), full softmax in chunks. [N] float64."""
    out = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        e = min(s + chunk, logits.shape[0])
        logp = logits[s:e].double().log_softmax(-1)  # [c, V]
        ids, sampled = rows.ids[s:e], rows.sampled[s:e]
        in_top = (ids == sampled[:, None]).any(-1)  # [c]
        all_ids = torch.cat([ids.clamp(min=0), sampled[:, None]], -1)  # [c, K+1]
        present = torch.cat([ids >= 0, ~in_top[:, None]], -1)  # [c, K+1]
        mu_lp = torch.cat([rows.lps[s:e].double(), rows.mu_sampled[s:e].double()[:, None]], -1)  # [c, K+1]
        pi_lp = logp.gather(-1, all_ids)  # [c, K+1]
        p_mu, p_pi = torch.where(present, mu_lp.exp(), 0.0), torch.where(present, pi_lp.exp(), 0.0)
        o_mu, o_pi = (1 - p_mu.sum(-1)).clamp(min=0), (1 - p_pi.sum(-1)).clamp(min=0)  # [c] the other mass
        if kind == "tv":
            d = 0.5 * ((p_mu - p_pi).abs().sum(-1) + (o_mu - o_pi).abs())
        else:
            d = torch.where(present, p_mu * (mu_lp - pi_lp), 0.0).sum(-1)
            d = d + torch.where(o_mu > 0, o_mu * (o_mu.log() - o_pi.clamp(min=1e-6).log()), 0.0)
        out[s:e] = torch.where(rows.is_response[s:e], d, 0.0)
    return out


def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(call, cuda: bool) -> tuple[torch.Tensor, float, float]:
    """(D, ms, MiB of peak memory above what was allocated before) of one call, after one warm-up call."""
    call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
        base = _vm_kib("VmRSS") * 1024
    start = time.perf_counter()
    div = call()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated() if cuda else _vm_kib("VmHWM") * 1024
    return div, ms, (peak - base) / 2**20


def kernel_divergence(logits: torch.Tensor, rows: PackedRows, kind: str) -> torch.Tensor:
    """D as the hook computes it on one Ulysses rank: the kernel on the laid-out rows, 0 off the responses. [N]"""
    div = kernels.topk_divergence(logits, rows.sampled, rows.ids, rows.lps, kind, mu_sampled_logprobs=rows.mu_sampled)
    return torch.where(rows.is_response, div, 0.0)


def hook_divergence(cfg, logits: torch.Tensor, data) -> torch.Tensor:
    """D from the engine hook, called as verl's FSDP engine calls it (logits [1, N, V]). [N]"""
    return ppo_loss_with_topk(cfg, student_logits=logits[None], data=data)[TOPK_DIV_KEY][0]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same check, slowly")
    return parser


def main() -> int:
    args = parser().parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_topk_check: no CUDA device (use --device cpu for the CPU run)")
    cuda = args.device == "cuda"
    logits, rows, seqs = build(args.tokens, args.vocab, args.k, args.device)
    print(
        f"{args.device}: {args.tokens} tokens, V={args.vocab}, K={args.k}, bf16 logits {logits.nbytes / 2**20:.0f} MiB"
    )
    if HAS_VERL:
        data = nested_batch(seqs, prompt_len=len(seqs["input_ids"][0]) - len(seqs["responses"][0]))
    else:
        print("SKIPPED the engine hook (ppo_loss_with_topk): verl is not installed; the kernel runs on its layout")
    ok = True
    for kind in ("tv", "kl"):
        ref = reference(rows, logits, kind)
        calls = {"kernel": functools.partial(kernel_divergence, logits, rows, kind)}
        if HAS_VERL:
            cfg = actor_config(cppo={"divergence": f"topk_{kind}", "topk": args.k})
            calls = {"hook": functools.partial(hook_divergence, cfg, logits, data), **calls}
        for path, call in calls.items():
            div, ms, extra_mib = measure(call, cuda)
            err = (div.double() - ref).abs()
            rel = float((err / ref.abs().clamp(min=1e-3)).max())
            print(
                f"{path} {kind}: max abs err {float(err.max()):.3e}, max rel err {rel:.3e}, {ms:.2f} ms, "
                f"+{extra_mib:.0f} MiB over the logits"
            )
            print(
                f"RESULT path={path} kind={kind} tokens={args.tokens} vocab={args.vocab} k={args.k} "
                f"max_abs_err={float(err.max()):.3e} ms={ms:.3f} extra_mib={extra_mib:.1f}"
            )
            ok &= bool(float(err.max()) < MAX_ABS_ERR)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
