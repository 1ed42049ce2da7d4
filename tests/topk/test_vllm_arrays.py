"""mu's top-K kept as arrays in vLLM's real frontend (``OutputProcessor``, detokenizer, stop strings), fed by
engine-step outputs built as vLLM 0.24's EngineCore sends them (``LogprobsLists``: [m, max_K + 1], column 0 the
sampled token, then the top-K best-first), from known distributions. No engine is started; the live engine is
covered by tests/topk/test_vllm_topk_live.py.
"""

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.logprobs import LogprobsProcessor
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.outputs import LogprobsLists

from tests.support.float32_bounds import UNIT_ROUNDOFF
from verl_cppo import hooks
from verl_cppo.testing import tiny_task
from verl_cppo.topk import rollout as rt
from verl_cppo.topk import servers as sv
from verl_cppo.topk.setup import VLLM_ARRAYS_HOOK, vllm_arrays_wrapper
from verl_cppo.topk.vllm_arrays import TopKArrays

PROMPT = "user a"
WORDS = ["user", "assistant", "a", "b", "c", "d", "\n"]


@pytest.fixture
def arrays_hook():
    hooks.wrap(
        "vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request", vllm_arrays_wrapper, name=VLLM_ARRAYS_HOOK
    )
    yield
    hooks.unwrap("vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_task.build_tokenizer()


def engine_steps(tokens, logprobs, width):
    """Per step, the LogprobsLists the EngineCore sends: [1, width] (column 0 sampled, then the top-(width-1))."""
    steps = []
    for token, row in zip(tokens, logprobs):
        top = torch.topk(row, width - 1)
        ids = np.array([[token, *top.indices.tolist()]], dtype=np.int32)
        lps = np.array([[float(row[token]), *top.values.tolist()]], dtype=np.float32)
        ranks = np.array([int((row >= row[token]).sum())], dtype=np.int32)
        steps.append(LogprobsLists(ids, lps, ranks))
    return steps


def run_frontend(tokenizer, params, tokens, steps, request_id="req-7"):
    """Feed ``tokens`` (one per step, with their logprob rows) through vLLM's OutputProcessor; final output."""
    processor = OutputProcessor(tokenizer, log_stats=False)
    request = EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=tokenizer.encode(PROMPT),
        mm_features=None,
        sampling_params=params,
        pooling_params=None,
        arrival_time=0.0,
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
        external_req_id=request_id,
    )
    processor.add_request(request, None)
    final = None
    for i, (token, step) in enumerate(zip(tokens, steps)):
        last = i == len(tokens) - 1
        out = EngineCoreOutput(
            request_id=request_id,
            new_token_ids=[token],
            new_logprobs=step,
            finish_reason=FinishReason.LENGTH if last else None,
        )
        result = processor.process_outputs([out])
        if result.request_outputs:
            final = result.request_outputs[-1]
        if final is not None and final.finished:
            break
    return final


def sampled(tokenizer, n, gen, vocab):
    logprobs = torch.log_softmax(3 * torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    word_ids = tokenizer.convert_tokens_to_ids(WORDS)
    tokens = [word_ids[int(torch.randint(len(word_ids), (1,), generator=gen))] for _ in range(n)]
    return tokens, logprobs


def generated_text(tokenizer, tokens):
    """The text of ``tokens`` after the prompt, decoded in one go (the reference for vLLM's incremental one)."""
    prompt = tokenizer.encode(PROMPT)
    return tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)) :]


def topk_params(k, **kw):
    request = {"temperature": 1.0, "max_tokens": 40, "logprobs": True, **kw}
    sv.vllm_topk_request(request, k)
    return SamplingParams(**request)


@pytest.mark.parametrize("k", [1, 4])
def test_topk_request_keeps_arrays_and_its_text(arrays_hook, tokenizer, gen, k):
    tokens, logprobs = sampled(tokenizer, 12, gen, vocab=len(tokenizer))
    steps = engine_steps(tokens, logprobs.float(), width=k + 3)  # a batch mate asked for K + 2
    final = run_frontend(tokenizer, topk_params(k), tokens, steps)
    completion = final.outputs[0]
    assert isinstance(completion.logprobs, TopKArrays)
    assert completion.text == generated_text(tokenizer, tokens)  # the text: detokenized as before
    extra = {}
    log_probs = sv.add_vllm_topk(extra, completion, k, "req-7")
    true = torch.topk(logprobs, k)
    np.testing.assert_array_equal(extra[rt.TOPK_IDS], true.indices.numpy())
    # the engine's float32 log-probs against the float64 ones they were rounded from: one rounding (<= u), 2x
    np.testing.assert_allclose(extra[rt.TOPK_LOG_PROBS], true.values.numpy(), rtol=2 * UNIT_ROUNDOFF)
    expected = [float(logprobs[i, t]) for i, t in enumerate(tokens)]
    np.testing.assert_allclose(log_probs, expected, rtol=2 * UNIT_ROUNDOFF)
    # their sum: n terms of one sign, each rounded (u), summed in float32 at worst ((n - 1) u): <= n u, 2x margin
    assert completion.cumulative_logprob == pytest.approx(sum(expected), rel=2 * len(tokens) * UNIT_ROUNDOFF)
    assert extra[rt.TOPK_IDS].dtype == np.int32 and extra[rt.TOPK_LOG_PROBS].dtype == np.float32


def test_stop_string_ends_text_and_rows_together(arrays_hook, tokenizer, gen):
    """A stop string is found in the detokenized text; every token vLLM keeps has its row, no more."""
    tokens, logprobs = sampled(tokenizer, 12, gen, vocab=len(tokenizer))
    words = tokenizer.convert_tokens_to_ids(["a", "b", "c", "d"])
    tokens[:6] = [words[0], words[1], words[0], words[2], words[3], words[1]]  # "a b a c d b ..."
    params = topk_params(2, stop=["c d"])
    final = run_frontend(tokenizer, params, tokens, engine_steps(tokens, logprobs.float(), 3))
    completion = final.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "c d"
    text = generated_text(tokenizer, tokens)
    assert completion.text == text[: text.index("c d")] and completion.text.strip() == "a b a"
    extra = {}
    log_probs = sv.add_vllm_topk(extra, completion, 2)
    n = len(completion.token_ids)
    assert n == 5 and extra[rt.TOPK_IDS].shape == (n, 2) and len(log_probs) == n
    np.testing.assert_array_equal(extra[rt.TOPK_IDS], torch.topk(logprobs[:n], 2).indices.numpy())


def test_request_without_topk_is_vllms_own(arrays_hook, tokenizer, gen):
    """verl's logprobs=0 request: the wrapped frontend gives exactly what vLLM's own gives."""
    tokens, logprobs = sampled(tokenizer, 8, gen, vocab=len(tokenizer))
    steps = engine_steps(tokens, logprobs.float(), 1)
    params = SamplingParams(temperature=1.0, max_tokens=40, logprobs=0)
    wrapped = run_frontend(tokenizer, params, tokens, steps).outputs[0]
    hooks.unwrap("vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request")
    plain = run_frontend(tokenizer, SamplingParams(temperature=1.0, max_tokens=40, logprobs=0), tokens, steps)
    plain = plain.outputs[0]
    assert type(wrapped.logprobs) is list and wrapped.logprobs == plain.logprobs
    assert (wrapped.text, wrapped.token_ids, wrapped.cumulative_logprob) == (
        plain.text,
        plain.token_ids,
        plain.cumulative_logprob,
    )
    assert hooks.hook_name(LogprobsProcessor.from_new_request) is None


def test_array_rows_span_blocks_and_slice(monkeypatch):
    monkeypatch.setattr("verl_cppo.topk.vllm_arrays.BLOCK_ROWS", 3)
    arrays = TopKArrays("r", 2, max_tokens=100)
    rows = np.arange(8 * 4, dtype=np.int64).reshape(8, 4)  # 8 positions, K + 1 = 3 used of 4 columns
    arrays.append(rows[:1], rows[:1].astype(np.float32))
    arrays.append(rows[1:6], rows[1:6].astype(np.float32))  # several positions in one step (spec decoding)
    arrays.append(rows[6:], rows[6:].astype(np.float32))
    ids, lps = arrays.arrays()
    np.testing.assert_array_equal(ids, rows[:, :3]) and np.testing.assert_array_equal(lps, rows[:, :3])
    assert len(arrays) == 8 and arrays.nbytes == 3 * 3 * 3 * 8  # three blocks of 3 rows x 3 columns x (4 + 4) B
    part = arrays[-2:]
    np.testing.assert_array_equal(part.arrays()[0], rows[6:, :3])
    part.extend(arrays[:1])
    np.testing.assert_array_equal(part.arrays()[0], rows[[6, 7, 0], :3])


def test_engine_output_of_the_wrong_shape_names_request_and_position():
    arrays = TopKArrays("req-9", 4)
    arrays.append(np.zeros((2, 5), np.int32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"'req-9': at generated position 2 .* shapes \(1, 3\).* expected \[m, >= 5\]"):
        arrays.append(np.zeros((1, 3), np.int32), np.zeros((1, 3), np.float32))


class _Completion:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, logprobs


def test_answer_with_a_missing_or_shifted_position_is_refused():
    arrays = TopKArrays("req-3", 2)
    rows = np.array([[5, 5, 6], [7, 8, 7], [9, 1, 2]])
    arrays.append(rows, -np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"'req-3': top-2 logprobs for 3 positions but 4 generated tokens "):
        sv.add_vllm_topk({}, _Completion([5, 7, 9, 4], arrays), 2, "req-3")
    with pytest.raises(
        ValueError, match=r"'req-3': logprob row 1 is for token 7 but generated position 1 holds token 8"
    ):
        sv.add_vllm_topk({}, _Completion([5, 8, 9], arrays), 2, "req-3")
    with pytest.raises(ValueError, match=r"top-K arrays have 2 columns, expected K=3"):
        sv.add_vllm_topk({}, _Completion([5, 7, 9], arrays), 3, "req-3")
    extra = {}
    assert sv.add_vllm_topk(extra, _Completion([5, 7, 9], arrays), 2, "req-3") == [-1.0, -1.0, -1.0]
    assert extra[rt.TOPK_IDS].tolist() == [[5, 6], [8, 7], [1, 2]]


def test_topk_request_marker_is_checked():
    from verl_cppo.topk.vllm_arrays import topk_of_request

    assert topk_of_request(SamplingParams(logprobs=0)) == 0
    assert topk_of_request(topk_params(3)) == 3
    bad = SamplingParams(logprobs=2, extra_args={rt.TOPK_REQUEST_KEY: 3})
    with pytest.raises(ValueError, match=r"must be an int K >= 1 equal to logprobs; got 3 with logprobs=2"):
        topk_of_request(bad)
    with pytest.raises(ValueError, match=r"needs K >= 1"):
        sv.vllm_topk_request({"logprobs": True}, 0)
