"""Rollout side of the Top-K divergences: server answers -> top-K arrays -> per-trajectory recording ->
response-aligned batch fields, against ground truth built from known distributions.

vLLM and SGLang cannot be imported on this CPU machine, so their answers are built here in the exact format
their 0.24.0 / 0.5.12 sources produce (cited per helper); verl's own AgentLoopOutput carries the responses.
"""

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
from verl.workers.rollout.replica import TokenOutput

from tests.support.float32_bounds import UNIT_ROUNDOFF
from verl_cppo.topk import rollout as rt
from verl_cppo.topk import servers as sv


@dataclass
class Logprob:
    """Field-for-field vllm.logprobs.Logprob (vLLM 0.24.0)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_position(logprobs_row: torch.Tensor, sampled: int, k: int) -> dict:
    """One position as vllm.logprobs.append_logprobs_for_next_position builds it (non-flat): token ids
    [sampled, top_1..top_k], ranks (rank of sampled = #tokens with a higher or equal log-prob, then 1..k)."""
    top = torch.topk(logprobs_row, k)
    token_ids = [sampled, *top.indices.tolist()]
    lps = [float(logprobs_row[sampled]), *top.values.tolist()]
    ranks = [int((logprobs_row >= logprobs_row[sampled]).sum()), *range(1, k + 1)]
    return {t: Logprob(lp, r) for t, lp, r in zip(token_ids, lps, ranks)}


@pytest.mark.parametrize("k", [1, 3, 8])
def test_vllm_topk_recovers_the_true_top_k(k, gen):
    logprobs = torch.log_softmax(3 * torch.randn(12, 30, generator=gen, dtype=torch.float64), -1)
    sampled = [int(torch.multinomial(row.exp(), 1, generator=gen)) for row in logprobs]
    sampled[0] = int(logprobs[0].argmax())  # inside the top-k
    sampled[1] = int(logprobs[1].argmin())  # far outside
    ids, lps = sv.vllm_topk([vllm_position(row, s, k) for row, s in zip(logprobs, sampled)], k)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and ids.shape == (12, k)
    true = torch.topk(logprobs, k)
    np.testing.assert_array_equal(ids, true.indices.numpy())
    np.testing.assert_allclose(lps, true.values.numpy(), rtol=2 * UNIT_ROUNDOFF)  # one float32 rounding (<= u), 2x


def test_vllm_topk_sampled_token_tied_with_the_kth():
    """A sampled token outside the top-k whose log-prob ties the k-th gets rank <= k from vLLM."""
    row = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64))
    position = vllm_position(row, sampled=2, k=2)  # torch.topk picks ids 0, 1; id 2 ties id 1
    assert len(position) == 3 and position[2].rank == 3
    position = {2: Logprob(float(row[2]), 2), 0: Logprob(float(row[0]), 1), 1: Logprob(float(row[1]), 2)}
    ids, _ = sv.vllm_topk([position], 2)
    assert ids.tolist() == [[0, 1]]


def test_vllm_topk_rejects_an_unexpected_answer():
    with pytest.raises(ValueError, match=r"'r-0': 1 logprobs at generated position 0; a logprobs=3 request"):
        sv.vllm_topk([{5: Logprob(-0.1, 1)}], 3, "r-0")
    with pytest.raises(ValueError, match=r"'r-0': no logprobs at generated position 0"):
        sv.vllm_topk([None], 3, "r-0")


def sglang_meta(logprobs: torch.Tensor, k: int) -> dict:
    """meta_info["output_top_logprobs"] as SGLang 0.5.12's detokenize_top_logprobs_tokens returns it
    (decode_to_text=False): per token, (logprob, token_id, None) ranked best-first."""
    top = torch.topk(logprobs, k)
    return {
        "output_top_logprobs": [
            [(float(v), int(i), None) for v, i in zip(vals, idx)] for vals, idx in zip(top.values, top.indices)
        ]
    }


def test_sglang_topk(gen):
    logprobs = torch.log_softmax(torch.randn(5, 20, generator=gen, dtype=torch.float64), -1)
    ids, lps = sv.sglang_topk(sglang_meta(logprobs, 4), 5, 4)
    np.testing.assert_array_equal(ids, torch.topk(logprobs, 4).indices.numpy())
    np.testing.assert_allclose(lps, torch.topk(logprobs, 4).values.numpy(), rtol=2 * UNIT_ROUNDOFF)  # float32, 2x
    # verl drops a mismatched answer to zero tokens: the top-K follows
    assert sv.sglang_topk({}, 0, 4)[0].shape == (0, 4)
    with pytest.raises(ValueError, match=r"output_top_logprobs for 5 tokens but 4 output ids"):
        sv.sglang_topk(sglang_meta(logprobs, 4), 4, 4)


def _answer(tokens, k, seed):
    """A server answer with K top-K rows whose first id is the token itself (easy to check alignment)."""
    g = np.random.default_rng(seed)
    ids = g.integers(100, 200, size=(len(tokens), k)).astype(np.int32)
    ids[:, 0] = tokens
    lps = -g.random((len(tokens), k)).astype(np.float32)
    extra = {rt.TOPK_IDS: ids, rt.TOPK_LOG_PROBS: lps, "global_steps": 3}
    return TokenOutput(token_ids=list(tokens), log_probs=[0.0] * len(tokens), extra_fields=extra)


def _output(response_ids, response_mask):
    return AgentLoopOutput(
        prompt_ids=[1, 2],
        response_ids=response_ids,
        response_mask=response_mask,
        metrics=AgentLoopMetrics(),
    )


def test_single_turn_truncated_to_the_response_length():
    with rt.generation_recorder() as recorded:
        answer = _answer([11, 12, 13, 14, 15], 3, seed=0)
        rt.record_generation([1, 2], answer)
        assert rt.TOPK_IDS not in answer.extra_fields and answer.extra_fields["global_steps"] == 3
        assert len(recorded) == 1
        fields = rt.response_topk_fields(_output([11, 12, 13, 14], [1, 1, 1, 1]), k=3)
    ids, lps = fields[rt.TOPK_IDS], fields[rt.TOPK_LOG_PROBS]
    assert ids.dtype == torch.int32 and lps.dtype == torch.float32 and ids.shape == (4, 3)
    assert ids[:, 0].tolist() == [11, 12, 13, 14]


def test_multi_turn_tool_tokens_and_trimmed_turn_end():
    """Turn 1 loses its last token (a chat-template merge), tool tokens (mask 0) separate the turns, turn 2
    is cut by the response length."""
    with rt.generation_recorder():
        rt.record_generation([1, 2], _answer([21, 22, 23], 2, seed=1))
        rt.record_generation([1, 2, 21, 22, 23, 90, 91], _answer([31, 32, 33], 2, seed=2))
        response = [21, 22, 90, 91, 31, 32]
        mask = [1, 1, 0, 0, 1, 1]
        fields = rt.response_topk_fields(_output(response, mask), k=2)
    ids = fields[rt.TOPK_IDS]
    assert ids[:, 0].tolist() == [21, 22, -1, -1, 31, 32]
    assert (ids[2:4] == -1).all() and (fields[rt.TOPK_LOG_PROBS][2:4] == 0).all()


def test_resumed_answer_joins_its_turn_and_a_run_may_span_two_turns():
    """The async trainers resume an aborted request with prompt + tokens so far: one turn. A turn followed by
    another with no tokens between them shows as one run of mask 1."""
    with rt.generation_recorder():
        rt.record_generation([1, 2], _answer([41, 42], 2, seed=3))
        rt.record_generation([1, 2, 41, 42], _answer([43], 2, seed=4))  # resume of the same turn
        rt.record_generation([1, 2, 41, 42, 43, 7], _answer([51, 52], 2, seed=5))  # next turn
        fields = rt.response_topk_fields(_output([41, 42, 43, 51, 52], [1, 1, 1, 1, 1]), k=2)
    assert fields[rt.TOPK_IDS][:, 0].tolist() == [41, 42, 43, 51, 52]


def test_misaligned_response_raises():
    with rt.generation_recorder():
        rt.record_generation([1, 2], _answer([61, 62], 2, seed=6))
        with pytest.raises(ValueError, match=r"positions \[0, 2\) match no recorded server answer"):
            rt.response_topk_fields(_output([61, 99], [1, 1]), k=2)
        with pytest.raises(ValueError, match=r"server returned K=2, expected 3"):
            rt.response_topk_fields(_output([61, 62], [1, 1]), k=3)


def test_nothing_recorded_is_an_error_when_enabled_and_nothing_when_off(monkeypatch):
    monkeypatch.delenv(rt.ENV_TOPK, raising=False)
    assert rt.response_topk_fields(_output([5], [1])) == {}
    monkeypatch.setenv(rt.ENV_TOPK, "4")
    with rt.generation_recorder():
        with pytest.raises(RuntimeError, match=r"VERL_CPPO_TOPK=4 but no rollout top-K was recorded"):
            rt.response_topk_fields(_output([5], [1]))
        fields = rt.response_topk_fields(_output([5, 6], [0, 0]))  # nothing generated: empty rows
    assert fields[rt.TOPK_IDS].shape == (2, 4) and (fields[rt.TOPK_IDS] == -1).all()
    monkeypatch.setenv(rt.ENV_TOPK, "zero")
    with pytest.raises(ValueError, match=r"VERL_CPPO_TOPK must be an int >= 1"):
        rt.rollout_topk()


def test_answer_outside_a_trajectory_is_dropped_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(rt, "_warned_unrecorded", False)
    answer = _answer([1, 2], 2, seed=7)
    with caplog.at_level(logging.WARNING, logger="verl_cppo.topk.rollout"):
        rt.record_generation([0], answer)
    assert rt.TOPK_IDS not in answer.extra_fields
    assert "outside an agent-loop trajectory" in caplog.text


def test_concurrent_trajectories_do_not_see_each_other():
    """verl runs each trajectory as its own asyncio task; the recorder is a context variable."""

    async def trajectory(token, delay):
        with rt.generation_recorder():
            await asyncio.sleep(delay)
            rt.record_generation([0], _answer([token, token + 1], 2, seed=token))
            await asyncio.sleep(0.01 - delay)
            return rt.response_topk_fields(_output([token, token + 1], [1, 1]), k=2)[rt.TOPK_IDS][:, 0].tolist()

    async def main():
        return await asyncio.gather(*(trajectory(t, d) for t, d in [(100, 0.005), (200, 0.0), (300, 0.008)]))

    assert asyncio.run(main()) == [[100, 101], [200, 201], [300, 301]]


def test_padding_sample_gets_empty_rows_of_its_own_length():
    sample = {rt.TOPK_IDS: torch.zeros(7, 4, dtype=torch.int32), rt.TOPK_LOG_PROBS: torch.zeros(7, 4)}
    rt.pad_topk_fields(sample, 1)
    assert sample[rt.TOPK_IDS].tolist() == [[-1] * 4] and sample[rt.TOPK_LOG_PROBS].shape == (1, 4)
    untouched = {"responses": torch.zeros(3)}
    rt.pad_topk_fields(untouched, 1)
    assert list(untouched) == ["responses"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({5: Logprob(-0.1, None), 6: Logprob(-2.0, 2)}, r"malformed logprob entries at generated position 1"),
        ({5: Logprob(-0.1, 1), 2**31: Logprob(-2.0, 2)}, r"token id 2147483648 at generated position 1, rank 2"),
        ({5: Logprob(-0.1, 1), 6: (-2.0, 2)}, r"malformed logprob entries at generated position 1"),
    ],
)
def test_vllm_malformed_entry_names_request_and_position(entry, message):
    good = {1: Logprob(-0.5, 1), 2: Logprob(-1.5, 2)}
    with pytest.raises(ValueError, match=r"vLLM request 'r-1': .*" + message):
        sv.vllm_topk([good, entry], 2, "r-1")


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            (-0.3, 7),
            r"top logprob entry \(-0.3, 7\) at generated position 1, rank 2 is not a \(logprob, token_id, text\) tuple",
        ),
        ((None, 7, None), r"logprob None at generated position 1, rank 2 is not a number"),
        ((-0.3, None, None), r"token id None at generated position 1, rank 2 is not a number"),
        ((-0.3, 2**31, None), r"token id 2147483648 at generated position 1, rank 2 is not an int32"),
        ((-0.3, 2**70, None), r"token id 1180591620717411303424 at generated position 1, rank 2 is not a number"),
        ((-0.3, 2.5, None), r"token id 2.5 at generated position 1, rank 2 is not a number"),
    ],
)
def test_sglang_malformed_entry_names_request_position_and_rank(bad, message):
    top = [[(-0.1, 1, None), (-0.2, 2, None)], [(-0.1, 3, None), bad]]
    with pytest.raises(ValueError, match=r"SGLang request 'r-2': " + message):
        sv.sglang_topk({"output_top_logprobs": top}, 2, 2, "r-2")


def test_sglang_wrong_count_and_k_zero():
    top = [[(-0.1, 1, None), (-0.2, 2, None)], [(-0.1, 3, None)]]
    with pytest.raises(ValueError, match=r"'r-3': 1 top logprobs at generated position 1; requested 2"):
        sv.sglang_topk({"output_top_logprobs": top}, 2, 2, "r-3")
    with pytest.raises(ValueError, match=r"SGLang top-K parsing needs K >= 1 \(K = 0 means no top-K is requested\)"):
        sv.sglang_topk({"output_top_logprobs": [[], []]}, 2, 0)
    extra = {}
    sv.add_sglang_topk(extra, {"output_top_logprobs": [[], []]}, 2, 0)  # K = 0: nothing asked, nothing added
    assert extra == {}
