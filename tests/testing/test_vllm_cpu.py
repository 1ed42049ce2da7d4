"""verl's own vLLM rollout on vLLM's CPU build (``verl_cppo.testing.vllm_cpu``), against the live engine.

These tests start vLLM engines (minutes each on CPU) and carry the ``vllm`` marker (``-m "not vllm"`` leaves
them out of a quick run). Each checks the real part by value:

* the live engine's top-K, parsed by the Top-K server code (``vllm_topk``), equals an independent float64
  forward of the same weights (log-softmax) within a float32 forward's rounding (~5e-4 for the tiny model);
* through ``main_ppo`` (Ray, FSDP2, verl's vLLM replica, server, worker extension and weight sync): PPO with
  recomputed old log-probs sees the rollout's log-probs equal the actor's at every step, which holds only if
  every weight sync reached vLLM, i.e. the FSDP2 engine's weight export (``get_per_tensor_param``, checked
  against the trained weights in tests/e2e/test_cpu_engine.py) arrived whole and under the right names;
  ``divergence=topk_tv`` with pi = mu gives D < 1e-4 at every step with full top-K coverage, so the Top-K
  server diff, the agent loop and the engine hook line up on a live server;
* a weight sync whose receiver never answers fails within the bound, naming the weight sync.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from ci.regression_checks import DEFAULT_CHECKS
from tests.support import REPO_ROOT
from tests.support.float32_bounds import float32_forward_tolerance
from verl_cppo.testing.launcher import CPU_ENV, TEST_ENV

pytestmark = pytest.mark.vllm

K = 4


def _regression(out, *args: str) -> dict:
    command = [sys.executable, "-m", "ci.tiny_regression", str(out), "--no-golden", "--arm-timeout=540", *args]
    env = {**os.environ, **TEST_ENV}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
    logs = "".join(
        f"\n--- {arm}/main_ppo.log ---\n{(out / arm / 'main_ppo.log').read_text()[-6000:]}"
        for arm in ("vanilla", "cppo_topk_tv")
        if (out / arm / "main_ppo.log").exists()
    )
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}{logs}"
    return json.loads((out / "metrics.json").read_text())


def _float64_log_probs(model_dir: str, sequence: list[int]) -> torch.Tensor:
    """log-softmax of the HF model's next-token logits along ``sequence``, float64: [len, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0]  # [len, vocab]
    return torch.log_softmax(logits, dim=-1)


def test_live_topk_equals_an_independent_forward(tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    from verl_cppo.testing import tiny_task
    from verl_cppo.topk.servers import vllm_topk

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    task = tiny_task.build(str(tmp_path / "task"), seed=0, n_train=4, n_val=1, head_dim=32)
    llm = LLM(model=task["model"], dtype="float32", enforce_eager=True, seed=0, max_model_len=64)
    tokenizer = tiny_task.build_tokenizer()
    chats = [[{"role": "user", "content": symbol}] for symbol in tiny_task.SYMBOLS[:4]]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"] for c in chats]
    params = SamplingParams(temperature=1.0, max_tokens=8, logprobs=K, seed=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    checked = 0
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        ids, log_probs = vllm_topk(completion.logprobs, K)  # [n, K] each
        reference = _float64_log_probs(task["model"], prompt + list(completion.token_ids))  # [len, vocab]
        # vLLM's float32 forward vs float64: the order of a float32 forward's error (no bound derivable across
        # two kernels; tests/support/float32_bounds.py), ~5e-4 here; a wrong row or token is off by > 1e-2
        tol = float32_forward_tolerance(task["model"], len(prompt) + len(completion.token_ids), reference)
        for i in range(len(completion.token_ids)):
            row = reference[len(prompt) - 1 + i]  # [vocab]: the distribution the i-th token was drawn from
            top = torch.topk(row, K + 1)
            assert torch.equal(torch.tensor(ids[i], dtype=torch.long), top.indices[:K]) or (
                top.values[K - 1] - top.values[K] < 2 * tol  # a near-tie at the K-th place may order either way
            ), (i, ids[i], top.indices)
            assert torch.allclose(torch.tensor(log_probs[i], dtype=torch.float64), row[ids[i]], rtol=0, atol=tol), i
            assert torch.allclose(torch.tensor(log_probs[i], dtype=torch.float64), top.values[:K], rtol=0, atol=tol)
            checked += 1
    assert checked >= len(prompts)  # every generated token of every answer was compared
    del llm


def test_weight_sync_reaches_vllm_through_main_ppo(tmp_path):
    """vanilla (old log-probs recomputed by the actor): rollout and actor log-probs agree after each sync."""
    rows = _regression(tmp_path / "run", "--arms=vanilla", "--steps=3")["vanilla"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        gap = row["training/rollout_probs_diff_max"]
        assert 0.0 <= gap <= DEFAULT_CHECKS["rollout_actor_prob_gap_max"], row  # stale weights give ~0.1 and more
    assert rows[-1]["actor/pg_clipfrac"] >= 0.0


def test_topk_tv_through_the_live_vllm_server(tmp_path):
    """pi = mu (one update per step): Top-K TV ~ float rounding at every step, every token with its top-K."""
    metrics = _regression(
        tmp_path / "run",
        "--arms=cppo_topk_tv",
        "--steps=2",
        "--override=actor_rollout_ref.actor.ppo_mini_batch_size=32",
    )
    rows = metrics["cppo_topk_tv"]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["actor/cppo_nonfinite_frac"] == 0.0, row
        assert row["actor/cppo_topk_coverage"] == 1.0, row
        assert 0.0 <= row["actor/cppo_div_mean"] < 1e-4, row
        assert row["actor/cppo_masked_frac"] == 0.0, row


def test_a_weight_sync_without_answer_fails_in_bounded_time():
    """verl's sender against a receiver that never replies: a TimeoutError naming the sync, after the bound."""
    from verl_cppo.testing.vllm_cpu import WEIGHT_SYNC_TIMEOUT_ENV

    env = {**os.environ, **TEST_ENV, **CPU_ENV, WEIGHT_SYNC_TIMEOUT_ENV: "2"}
    script = os.path.join(REPO_ROOT, "tests", "support", "weight_sync_script.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["error"] == "TimeoutError", result
    assert "weight sync to the vLLM rollout failed" in result["message"], result
    assert f"within 2 s ({WEIGHT_SYNC_TIMEOUT_ENV})" in result["message"], result
    assert 2.0 <= result["seconds"] < 30, result
