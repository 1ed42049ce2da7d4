"""Record one real vLLM rollout of the tiny task (vLLM's CPU build), for the multi-rank equivalence tests.

Four prompts x four answers from the seeded tiny Qwen3 (``tiny_task.build_model(seed=0, head_dim=32)``), each
answer with mu's log-prob of every sampled token and mu's top-K (``vllm_topk``, K = 4) as verl's vLLM server
returns them, plus the task's reward. The first group is sampled greedily, so its four answers are equal and
``cppo_grpo`` excludes it (zero reward variance); the others are sampled at temperature 1. mu's log-probs are
vLLM's raw log-probs (the model's distribution at temperature 1) for every group.

    PYTHONPATH=. python -m tests.support.record_rollout tests/support/data/multirank_rollout.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

K = 4
GROUPS, N = 4, 4
MAX_TOKENS = 10


def weights_checksum(model: torch.nn.Module) -> float:
    """sum |w| over the state dict: the tests rebuild the model and refuse a different one."""
    return float(sum(t.double().abs().sum() for t in model.state_dict().values()))


def main(out: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams

    from verl_cppo.testing import tiny_task
    from verl_cppo.topk.rollout import vllm_topk

    model = tiny_task.build_model(seed=0, head_dim=32)
    tokenizer = tiny_task.build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        llm = LLM(model=tmp, dtype="float32", enforce_eager=True, seed=0, max_model_len=64)
        symbols = tiny_task.SYMBOLS[:GROUPS]
        chats = [[{"role": "user", "content": s}] for s in symbols]
        prompts = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"] for c in chats
        ]
        rows = []
        for g, (symbol, prompt) in enumerate(zip(symbols, prompts)):
            for i in range(N):
                temperature = 0.0 if g == 0 else 1.0
                params = SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, logprobs=K, seed=100 * g + i)
                (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
                completion = output.outputs[0]
                ids, lps = vllm_topk(completion.logprobs, K)  # [R, K] each
                sampled = [lp_dict[t].logprob for lp_dict, t in zip(completion.logprobs, completion.token_ids)]
                text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                rows.append(
                    {
                        "group": g,
                        "prompt": list(prompt),
                        "response": list(completion.token_ids),
                        "rollout_log_probs": sampled,
                        "topk_ids": ids.tolist(),
                        "topk_log_probs": lps.tolist(),
                        "score": tiny_task.compute_score(tiny_task.DATA_SOURCE, text, symbol),
                        "temperature": temperature,
                    }
                )
        del llm
    record = {
        "source": f"vllm {vllm.__version__} (CPU build), tests/support/record_rollout.py",
        "model": {"seed": 0, "head_dim": 32, "weights_abs_sum": weights_checksum(model)},
        "k": K,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f)
    print(json.dumps({"responses": len(rows), "scores": [r["score"] for r in rows]}))


if __name__ == "__main__":
    main(sys.argv[1])
