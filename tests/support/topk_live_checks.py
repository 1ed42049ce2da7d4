"""The Top-K rollout path on a live vLLM engine, through verl's own ``vLLMHttpServer.generate`` with the Top-K diff.

Run in a process of its own by ``tests/topk/test_vllm_topk_live.py``: the Top-K diffs patch verl's modules as
they are first imported (as in a Ray worker), which a pytest process that already ran other tests cannot offer.

The engine is started as ``benchmarks/bench_vllm_topk.py`` starts it: verl's config, the engine arguments verl's
``launch_server`` parses (tokenizer initialised, EngineCore and worker in processes of their own), real weights
(``load_format=auto``) of the tiny task's model. Checked by value:

* K = 4: mu's top-K on every generated token equals an independent float64 forward of the same weights (ids;
  log-probs within a float32 forward's rounding), and verl's sampled-token log-probs, now read from the same
  arrays, equal that forward too;
* the same seeded request without Top-K (verl's own ``logprobs=0``) gives the same tokens and log-probs;
* a stop string ends the answer (vLLM finds it in the detokenized text) and the top-K rows end with it.
"""

import asyncio
import os

import numpy as np
import pytest
import torch

K = 4
TOKENS = 12


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from benchmarks import bench_vllm_topk as bench
    from verl_cppo.testing import tiny_task
    from verl_cppo.topk.rollout import ENV_TOPK
    from verl_cppo.topk.setup import install_topk_runtime

    saved = os.environ.get(ENV_TOPK)
    os.environ.update({ENV_TOPK: str(K), "VLLM_CPU_KVCACHE_SPACE": "1"})
    install_topk_runtime()
    task = tiny_task.build(str(tmp_path_factory.mktemp("task")), seed=0, n_train=4, n_val=1, head_dim=32)
    server, args = bench.verl_server(
        task["model"], TOKENS, 4, cuda=False, extra_overrides=("actor_rollout_ref.rollout.load_format=auto",)
    )
    loop = asyncio.new_event_loop()
    server.engine = loop.run_until_complete(bench.start_engine(args))
    tokenizer = tiny_task.build_tokenizer()
    chats = [[{"role": "user", "content": s}] for s in tiny_task.SYMBOLS[:2]]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"] for c in chats]
    yield server, loop, task["model"], prompts, tokenizer
    server.engine.shutdown()
    tasks = asyncio.all_tasks(loop)  # the engine's output handler: cancelled before the loop closes
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()
    if saved is None:
        os.environ.pop(ENV_TOPK, None)
    else:
        os.environ[ENV_TOPK] = saved


def _generate(live, prompt, k, request_id, **params):
    from verl_cppo.topk.rollout import ENV_TOPK

    server, loop = live[0], live[1]
    os.environ[ENV_TOPK] = str(k) if k else ""
    request = {"temperature": 1.0, "logprobs": True, "max_tokens": TOKENS, "seed": 5, **params}
    try:
        return loop.run_until_complete(server.generate(list(prompt), request, request_id))
    finally:
        os.environ[ENV_TOPK] = str(K)


def _float64_log_probs(model_dir, sequence):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([sequence])).logits[0], dim=-1)  # [len, vocab]


def _forward_tolerance(model_dir, seq_len, reference):
    """vLLM's float32 forward against the float64 one: no bound can be derived (vLLM's CPU attention and paged
    KV cache share no summation order with HF's forward), so the order of a float32 forward's error at the
    logits' spread, 2x margin (tests.support.float32_bounds.float32_forward_tolerance): ~5e-4 for this model.
    A wrong row, token or temperature moves a log-prob by > 1e-2."""
    from tests.support.float32_bounds import float32_forward_tolerance

    return float32_forward_tolerance(model_dir, seq_len, reference)


def test_topk_and_sampled_log_probs_equal_an_independent_forward(live):
    from verl_cppo.topk.rollout import TOPK_IDS, TOPK_LOG_PROBS

    model_dir, prompts = live[2], live[3]
    checked = 0
    for j, prompt in enumerate(prompts):
        out = _generate(live, prompt, K, f"topk-{j}")
        ids, lps = out.extra_fields[TOPK_IDS], out.extra_fields[TOPK_LOG_PROBS]  # [n, K] each
        assert ids.dtype == np.int32 and lps.dtype == np.float32 and ids.shape == (len(out.token_ids), K)
        reference = _float64_log_probs(model_dir, prompt + list(out.token_ids))
        tol = _forward_tolerance(model_dir, len(prompt) + len(out.token_ids), reference)
        for i, token in enumerate(out.token_ids):
            row = reference[len(prompt) - 1 + i]  # [vocab]
            top = torch.topk(row, K + 1)
            assert torch.equal(torch.from_numpy(ids[i]).long(), top.indices[:K]) or (
                top.values[K - 1] - top.values[K] < 2 * tol  # a near-tie at the K-th place may order either way
            ), (i, ids[i], top.indices)
            np.testing.assert_allclose(lps[i], row[torch.from_numpy(ids[i]).long()].numpy(), rtol=0, atol=tol)
            assert abs(out.log_probs[i] - float(row[token])) <= tol, (i, tol)
            checked += 1
    assert checked >= len(prompts)  # every generated token of every answer was compared


def test_request_without_topk_is_verls_own_and_agrees(live):
    from verl_cppo.topk.rollout import TOPK_IDS

    prompt = live[3][0]
    plain = _generate(live, prompt, 0, "plain")
    topk = _generate(live, prompt, K, "topk-same-seed")
    assert TOPK_IDS not in plain.extra_fields
    assert list(plain.token_ids) == list(topk.token_ids)
    # the same prompt alone in the engine, so the same float32 forward; whatever differs is within twice the
    # forward's rounding (both float32). Log-probs of processed logits or another token differ by > 1e-2.
    reference = _float64_log_probs(live[2], prompt + list(plain.token_ids))
    tol = _forward_tolerance(live[2], len(prompt) + len(plain.token_ids), reference)
    np.testing.assert_allclose(plain.log_probs, topk.log_probs, rtol=0, atol=2 * tol)
    assert plain.stop_reason == topk.stop_reason


def test_stop_string_ends_tokens_and_top_k_rows_together(live):
    from verl_cppo.topk.rollout import TOPK_IDS

    prompt, tokenizer = live[3][0], live[4]
    free = _generate(live, prompt, K, "free")
    words = tokenizer.convert_ids_to_tokens(list(free.token_ids))
    # a stop word that is no substring of another word of the vocabulary ("a" is in "assistant")
    stop = next((w for w in words[1:] if w in ("b", "c", "d", "user")), None)
    assert stop is not None, f"the seeded answer {words} has no usable stop word; change the seed"
    first = words.index(stop)
    stopped = _generate(live, prompt, K, "stopped", stop=[stop], max_tokens=TOKENS)
    n = len(stopped.token_ids)
    assert n == first + 1 and stopped.stop_reason == "completed", (words, stop, n)  # ends on its first occurrence
    assert list(stopped.token_ids) == list(free.token_ids[:n])
    assert stopped.extra_fields[TOPK_IDS].shape == (n, K)
    np.testing.assert_array_equal(stopped.extra_fields[TOPK_IDS], free.extra_fields[TOPK_IDS][:n])
