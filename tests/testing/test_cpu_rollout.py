"""The hf_cpu rollout: sampled log-probs against an independent full forward, batch invariance, the server's
verl contract (TokenOutput, sleep / wake_up, weight updates) with verl's real config classes."""

import asyncio

import pytest
import torch
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.replica import RolloutMode, TokenOutput

from verl_cppo.testing import tiny_task as T
from verl_cppo.testing.cpu_rollout import HFCPUServer
from verl_cppo.testing.sampling import sample_batch

EOS = T.VOCAB.index("<|im_end|>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return T.build(str(tmp_path_factory.mktemp("tiny")), n_train=4, n_val=4)["model"]


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def prompt(symbol: str) -> list[int]:
    words = ["<|im_start|>", "user", "\n", symbol, "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    return [T.VOCAB.index(w) for w in words]


def full_forward_log_probs(model, prompt_ids, response_ids, temperature=1.0):
    """Reference: one forward over prompt + response, log_softmax(logits / T) at each response token."""
    seq = torch.tensor([prompt_ids + response_ids])  # [1, P + R]
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt_ids) - 1 : -1].double() / temperature  # [R, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)  # [R]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_match_a_full_forward(model, temperature):
    prompts = [prompt(s) for s in "abcd"]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    results = sample_batch(model, prompts, [8] * 4, {EOS}, gens, temperature=temperature)
    for p, r in zip(prompts, results):
        assert 1 <= len(r.token_ids) == len(r.log_probs) <= 8
        assert r.stopped == (r.token_ids[-1] == EOS)
        assert EOS not in r.token_ids[:-1]
        ref = full_forward_log_probs(model, p, r.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(r.log_probs, dtype=torch.float64), ref, atol=2e-5, rtol=0)


def test_a_row_does_not_depend_on_its_batch(model):
    """Per-request seeds make sampling independent of arrival order only if batching is row-invariant."""
    prompts = [prompt(s) for s in "abcdabcd"]
    budgets = [8, 3, 8, 5, 1, 8, 2, 8]
    together = sample_batch(model, prompts, budgets, {EOS}, [torch.Generator().manual_seed(i) for i in range(8)])
    for i in range(8):
        alone = sample_batch(model, [prompts[i]], [budgets[i]], {EOS}, [torch.Generator().manual_seed(i)])[0]
        assert alone.token_ids == together[i].token_ids
        torch.testing.assert_close(alone.log_probs, together[i].log_probs, atol=1e-6, rtol=0)
        assert len(alone.token_ids) <= budgets[i]


def test_greedy_top_k_and_budget(model):
    p = prompt("a")
    greedy = sample_batch(model, [p], [6], set(), [torch.Generator()], temperature=0.0)[0]
    ref = full_forward_log_probs(model, p, greedy.token_ids)
    with torch.no_grad():
        seq = torch.tensor([p + greedy.token_ids])
        argmax = model(seq).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
    assert greedy.token_ids == argmax and len(greedy.token_ids) == 6 and not greedy.stopped
    torch.testing.assert_close(torch.tensor(greedy.log_probs, dtype=torch.float64), ref, atol=2e-5, rtol=0)
    # top_k=1 samples the argmax whatever the seed, and reports the full-vocabulary log-prob
    top1 = sample_batch(model, [p], [6], set(), [torch.Generator().manual_seed(7)], top_k=1)[0]
    assert top1.token_ids == greedy.token_ids
    torch.testing.assert_close(top1.log_probs, greedy.log_probs, atol=1e-6, rtol=0)


def test_bad_batches_are_refused(model):
    with pytest.raises(ValueError, match="one length"):
        sample_batch(model, [prompt("a"), prompt("a")[1:]], [4, 4], {EOS}, [torch.Generator()] * 2)
    with pytest.raises(ValueError, match="budget"):
        sample_batch(model, [prompt("a")], [0], {EOS}, [torch.Generator()])


def _server(model_dir, **rollout):
    config = RolloutConfig(name="hf_cpu", dtype="float32", prompt_length=16, response_length=8, **rollout)
    model_config = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"})
    return HFCPUServer(config, model_config, RolloutMode.HYBRID, replica_rank=0, node_rank=0)


def test_server_serves_concurrent_requests_like_single_ones(model_dir):
    server = _server(model_dir, full_determinism=True)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}

    order = list(enumerate("abcdabcd"))
    batch = asyncio.run(_gather(server, params, order))
    assert all(isinstance(out, TokenOutput) and out.log_probs is not None for out in batch)
    rerun = _server(model_dir, full_determinism=True)  # same seeds, requests arriving in reverse order
    reversed_order = asyncio.run(_gather(rerun, params, order[::-1]))
    by_id = {i: out for (i, _), out in zip(order[::-1], reversed_order)}
    for i, out in enumerate(batch):
        assert out.token_ids == by_id[i].token_ids
        assert out.log_probs == pytest.approx(by_id[i].log_probs, abs=1e-6)
        assert out.extra_fields["global_steps"] is None
    # the next step reuses the request ids: new samples, not a replay
    again = asyncio.run(_gather(server, params, order))
    assert [o.token_ids for o in again] != [o.token_ids for o in batch]


async def _gather(server, params, ids):
    return await asyncio.gather(*[server.generate(prompt(s), dict(params), f"det-{i}") for i, s in ids])


def test_server_sleeps_and_takes_weights(model_dir, model):
    server = _server(model_dir)
    params = {"temperature": 1.0, "logprobs": True}
    asyncio.run(server.sleep())
    with pytest.raises(RuntimeError, match="asleep"):
        asyncio.run(server.generate(prompt("a"), dict(params), "r0"))
    # new weights: every parameter scaled; the server must use them after the sync
    new = [(n, p.detach() * 1.5) for n, p in model.state_dict().items() if n != "lm_head.weight"]
    assert asyncio.run(server.update_weights(new, global_steps=3)) == len(new)
    asyncio.run(server.wake_up(tags=["weights"]))
    out = asyncio.run(server.generate(prompt("a"), dict(params), "r1"))
    assert out.extra_fields["global_steps"] == 3
    scaled = type(model)(model.config)
    scaled.load_state_dict(dict(new), strict=False)
    scaled.tie_weights()
    ref = full_forward_log_probs(scaled.eval(), prompt("a"), out.token_ids)
    torch.testing.assert_close(torch.tensor(out.log_probs, dtype=torch.float64), ref, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        asyncio.run(server.update_weights(new[1:], global_steps=4))
    with pytest.raises(ValueError, match="unknown"):
        asyncio.run(server.update_weights([*new, ("model.extra.weight", torch.zeros(1))], global_steps=4))
