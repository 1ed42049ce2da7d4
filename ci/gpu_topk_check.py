"""GPU check of the Top-K engine hook (not run by CI: CI has no GPU). Usage on a CUDA machine:

    .venv/bin/python -m ci.gpu_topk_check [--tokens 8192] [--vocab 151936] [--k 20] [--device cpu]

Builds one packed micro-batch (4 sequences) with mu's top-K, bf16 pi logits on the GPU, runs the hook exactly as
verl's FSDP engine calls it (``ppo_loss_with_topk(config, student_logits=..., data=...)``, CUDA tensors), and
compares D on every response token with a float64 full-softmax reference computed in chunks. Prints the max
errors, the hook's time and its peak extra memory over the logits (on CPU: the rise of the process's peak
resident set, allocator noise included). Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from tests.support.verl_inputs import actor_config
from verl_cppo.topk.engine_hook import TOPK_DIV_KEY, full_sequence_topk_inputs, ppo_loss_with_topk


def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def build(tokens: int, vocab: int, k: int, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_seq = 4
    seq_len = tokens // n_seq
    prompt_len = seq_len // 4
    resp_len = seq_len - prompt_len
    logits = torch.empty(n_seq * seq_len, vocab, dtype=torch.bfloat16, device=device)
    mu = torch.empty(n_seq * seq_len, vocab, dtype=torch.bfloat16, device=device)  # mu's log-probs
    for r0 in range(0, logits.shape[0], 512):  # chunks keep the set-up's own memory small
        x = 2.0 * torch.randn(min(512, logits.shape[0] - r0), vocab, generator=gen)  # [c, V]
        logits[r0 : r0 + len(x)] = x.to(device, torch.bfloat16)
        noisy = x.to(torch.bfloat16).float() + 0.5 * torch.randn(x.shape, generator=gen)
        mu[r0 : r0 + len(x)] = noisy.log_softmax(-1).to(device, torch.bfloat16)
    seqs, responses, ids, lps, mus = [], [], [], [], []
    for b in range(n_seq):
        rows = mu[b * seq_len + prompt_len - 1 : b * seq_len + prompt_len - 1 + resp_len].float()  # [resp, V]
        resp = torch.multinomial(rows.exp(), 1).squeeze(-1)
        top = torch.topk(rows, k)
        seqs.append(torch.cat([torch.randint(0, vocab, (prompt_len,), device=device), resp]))
        responses.append(resp)
        ids.append(top.indices.int())
        lps.append(top.values)
        mus.append(rows.gather(-1, resp[:, None]).squeeze(-1))
    data = TensorDict(
        {
            "input_ids": _nested(seqs),
            "prompts": _nested([s[:prompt_len] for s in seqs]),
            "responses": _nested(responses),
            "rollout_log_probs": _nested(mus),
            "rollout_topk_ids": _nested(ids),
            "rollout_topk_log_probs": _nested(lps),
        },
        batch_size=[n_seq],
    )
    return data, logits


def reference(data, logits, kind: str, chunk: int = 512) -> torch.Tensor:
    """float64 D on every row (0 off the response rows), full softmax in chunks."""
    inp = {name: t.values() for name, t in full_sequence_topk_inputs(data).items()}
    out = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        e = min(s + chunk, logits.shape[0])
        logp = logits[s:e].double().log_softmax(-1)
        ids, sampled, flag = inp["ids"][s:e], inp["sampled"][s:e], inp["is_response"][s:e]
        in_top = (ids == sampled[:, None]).any(-1)
        all_ids = torch.cat([ids.clamp(min=0), sampled[:, None]], -1)
        present = torch.cat([ids >= 0, ~in_top[:, None]], -1)
        mu_lp = torch.cat([inp["lps"][s:e].double(), inp["mu_sampled"][s:e].double()[:, None]], -1)
        pi_lp = logp.gather(-1, all_ids)
        p_mu, p_pi = torch.where(present, mu_lp.exp(), 0.0), torch.where(present, pi_lp.exp(), 0.0)
        o_mu, o_pi = (1 - p_mu.sum(-1)).clamp(min=0), (1 - p_pi.sum(-1)).clamp(min=0)
        if kind == "tv":
            d = 0.5 * ((p_mu - p_pi).abs().sum(-1) + (o_mu - o_pi).abs())
        else:
            d = torch.where(present, p_mu * (mu_lp - pi_lp), 0.0).sum(-1)
            d = d + torch.where(o_mu > 0, o_mu * (o_mu.log() - o_pi.clamp(min=1e-6).log()), 0.0)
        out[s:e] = torch.where(flag, d, 0.0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same check, slowly")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_topk_check: no CUDA device (use --device cpu for the CPU run)")
    cuda = args.device == "cuda"
    data, logits = build(args.tokens, args.vocab, args.k, args.device)
    print(
        f"{args.device}: {args.tokens} tokens, V={args.vocab}, K={args.k}, bf16 logits {logits.nbytes / 2**20:.0f} MiB"
    )
    ok = True
    for kind in ("tv", "kl"):
        cfg = actor_config(cppo={"divergence": f"topk_{kind}", "topk": args.k})

        def call(cfg=cfg):
            return ppo_loss_with_topk(cfg, student_logits=logits[None], data=data)[TOPK_DIV_KEY]

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
        extra_mb = (peak - base) / 2**20
        ref = reference(data, logits, kind)
        err = (div.squeeze(0).double() - ref).abs()
        rel = float((err / ref.abs().clamp(min=1e-3)).max())
        print(
            f"{kind}: max abs err {float(err.max()):.3e}, max rel err {rel:.3e}, hook {ms:.2f} ms, "
            f"+{extra_mb:.0f} MiB over the logits"
        )
        ok &= bool(float(err.max()) < 1e-3)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
