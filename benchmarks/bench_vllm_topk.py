"""Rollout cost of mu's Top-K on vLLM's CPU build: throughput with logprobs=0 (what verl asks for) vs K = 4, 20.

One process, one engine (the tiny task's random 2-layer Qwen3, ``tiny_task.build_model``, at head size 32 and
with a VOCAB-token vocabulary, so that K = 20 is a real choice; float32, eager, no tokenizer), the same seeded
prompts for every
setting, each setting timed over REPEATS generate calls after one warm-up call; prints tokens/s per setting and
the ratio to logprobs=0. Then the bytes per response token that the Top-K fields add through TransferQueue:
``rollout_topk_ids`` int32 [T, K] + ``rollout_topk_log_probs`` float32 [T, K], measured on the tensors that
``response_topk_fields`` builds from a live answer, next to the bytes of the fields verl already sends per token
(``responses`` int64, ``response_mask`` int64, ``rollout_log_probs`` float32).

    .venv/bin/python -m benchmarks.bench_vllm_topk [--prompts 256] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPEATS = 3
VOCAB = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from verl_cppo.testing.tiny_task import build_model
    from verl_cppo.topk.rollout import TOPK_IDS, TOPK_LOG_PROBS, vllm_topk

    model_dir = tempfile.mkdtemp()
    build_model(seed=0, head_dim=32, vocab_size=VOCAB).save_pretrained(model_dir)
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=64, skip_tokenizer_init=True)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(0, VOCAB - 1, (8,), generator=generator).tolist()}
        for _ in range(args.prompts)
    ]
    rates = {}
    for logprobs in (0, 4, 20):
        k = logprobs
        params = SamplingParams(
            temperature=1.0, max_tokens=args.tokens, min_tokens=args.tokens, logprobs=k, seed=1, detokenize=False
        )
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        start, tokens = time.perf_counter(), 0
        for _ in range(REPEATS):
            outputs = llm.generate(prompts, params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        rates[logprobs] = (k, tokens / (time.perf_counter() - start))
        if k:
            ids, lps = vllm_topk(outputs[0].outputs[0].logprobs, k)  # [T, K] each
            fields = {TOPK_IDS: torch.from_numpy(ids), TOPK_LOG_PROBS: torch.from_numpy(lps)}
            added = sum(t.element_size() * t.shape[1] for t in fields.values())
            rates[logprobs] += (added,)
    base_bytes = 8 + 8 + 4  # responses int64, response_mask int64, rollout_log_probs float32 per token
    print(
        f"vocabulary {VOCAB}, {args.prompts} prompts x {args.tokens} tokens, {REPEATS} timed calls per setting, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| request | K | tokens/s | vs logprobs=0 | Top-K bytes / token (vs verl's 20) |")
    print("|---|---|---|---|---|")
    for logprobs, (k, rate, *added) in rates.items():
        extra = f"{added[0]} (+{added[0] / base_bytes:.1f}x)" if added else "0"
        print(f"| logprobs={logprobs} | {k} | {rate:,.0f} | {rate / rates[0][1]:.2f} | {extra} |")


if __name__ == "__main__":
    main()
