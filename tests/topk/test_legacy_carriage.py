"""mu's top-K rows travel the legacy trainer's path (``trainer.use_v1=False``) with verl's real functions and reach
the engine hook aligned with each response:

verl's ``AgentLoopWorker._agent_loop_postprocess`` (padding) wrapped by ``padded_topk_postprocess``, per trajectory
inside its ``generation_recorder`` -> verl's ``AgentLoopWorker._postprocess`` (the DataProto batch) wrapped by
``topk_into_batch`` -> ``DataProto.reorder`` (what ``_balance_batch`` does) -> ``to_tensordict`` and
``left_right_2_no_padding`` (the legacy ``_update_actor``) -> ``make_iterator`` and ``prepare_micro_batches``
(the engine) -> ``full_sequence_topk_inputs``.

The worker is verl's class with the state these two methods read (tokenizer, rollout lengths, no processor,
reward or teacher); nothing of verl is replaced.
"""

import asyncio

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, AgentLoopWorker
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.padding import left_right_2_no_padding

from verl_cppo.testing import tiny_task
from verl_cppo.topk import rollout as rt
from verl_cppo.topk.engine_hook import full_sequence_topk_inputs

K = 3
PROMPT_LENGTH, RESPONSE_LENGTH = 6, 10
VOCAB = len(tiny_task.VOCAB)


def _worker() -> AgentLoopWorker:
    worker = object.__new__(AgentLoopWorker)  # __init__ starts servers; these methods read only the state below
    worker.tokenizer = tiny_task.build_tokenizer()
    worker.processor = None
    worker.mm_processor_kwargs = None
    worker.rollout_config = OmegaConf.create({"prompt_length": PROMPT_LENGTH, "response_length": RESPONSE_LENGTH})
    worker.reward_loop_worker_handles = None
    worker.distillation_enabled = False
    return worker


def _answer(gen, prompt_len, tokens):
    """A server answer whose first top-K id of row t is token t, so alignment is visible downstream."""
    ids = torch.randint(0, VOCAB, (len(tokens), K), generator=gen).int()
    ids[:, 0] = torch.tensor(tokens)
    return rt.Generation(prompt_len, list(tokens), ids.numpy(), -torch.rand(len(tokens), K, generator=gen).numpy())


def _trajectory(gen, prompt_len, turns, tool_len):
    """(AgentLoopOutput, answers): ``turns`` generated runs with ``tool_len`` tool tokens between them."""
    prompt = torch.randint(3, VOCAB, (prompt_len,), generator=gen).tolist()
    response, mask, answers = [], [], []
    for i, length in enumerate(turns):
        if i:
            response += torch.randint(3, VOCAB, (tool_len,), generator=gen).tolist()
            mask += [0] * tool_len
        tokens = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        answers.append(_answer(gen, prompt_len + len(response), tokens))
        response += tokens
        mask += [1] * length
    output = AgentLoopOutput(
        prompt_ids=prompt,
        response_ids=response,
        response_mask=mask,
        response_logprobs=(-torch.rand(len(response), generator=gen)).tolist(),
        metrics=AgentLoopMetrics(),
    )
    return output, answers


async def _postprocess_one(worker, output, answers):
    postprocess = rt.padded_topk_postprocess(AgentLoopWorker._agent_loop_postprocess)
    with rt.generation_recorder() as recorded:  # what the patched _run_agent_loop opens per trajectory
        recorded.extend(answers)
        return await postprocess(worker, output, False, raw_prompt=[])


@pytest.fixture
def batch(gen, monkeypatch):
    monkeypatch.setenv(rt.ENV_TOPK, str(K))
    worker = _worker()
    shapes = [(4, [6], 0), (2, [1], 0), (6, [3, 2], 2), (3, [RESPONSE_LENGTH], 0), (5, [2, 1, 2], 1), (2, [5], 0)]
    trajectories = [_trajectory(gen, p, turns, tool) for p, turns, tool in shapes]
    padded = [asyncio.run(_postprocess_one(worker, output, answers)) for output, answers in trajectories]
    data = rt.topk_into_batch(AgentLoopWorker._postprocess)(worker, padded, input_non_tensor_batch=None)
    return data, trajectories


def test_the_dataproto_batch_carries_padded_rows_like_rollout_log_probs(batch):
    data, trajectories = batch
    ids, lps = data.batch[rt.TOPK_IDS], data.batch[rt.TOPK_LOG_PROBS]
    assert ids.shape == (len(trajectories), RESPONSE_LENGTH, K) and ids.dtype == torch.int32
    assert lps.shape == ids.shape and lps.dtype == torch.float32
    assert data.batch["rollout_log_probs"].shape == ids.shape[:2]
    assert rt.TOPK_IDS not in data.non_tensor_batch and rt.TOPK_LOG_PROBS not in data.non_tensor_batch
    for b, (output, answers) in enumerate(trajectories):
        expected = torch.full((RESPONSE_LENGTH, K), -1, dtype=torch.int32)  # padding and tool tokens: no entry
        expected_lps = torch.zeros(RESPONSE_LENGTH, K)
        runs = [i for i, m in enumerate(output.response_mask) if m]
        expected[runs] = torch.from_numpy(np.concatenate([a.topk_ids for a in answers]))
        expected_lps[runs] = torch.from_numpy(np.concatenate([a.topk_log_probs for a in answers]))
        assert torch.equal(ids[b], expected), b
        assert torch.equal(lps[b], expected_lps), b


def test_the_rows_reach_the_engine_aligned_after_the_legacy_trainers_steps(batch):
    data, trajectories = batch
    data.reorder(torch.tensor([3, 0, 5, 1, 4, 2]))  # _balance_batch reorders the DataProto in place
    data.batch["old_log_probs"] = data.batch["rollout_log_probs"]  # bypass mode (apply_bypass_mode)
    td = left_right_2_no_padding(data.to_tensordict())  # RayPPOTrainer._update_actor
    tool_tokens = sum(len(o.response_mask) - sum(o.response_mask) for o, _ in trajectories)
    response_tokens = sum(len(o.response_ids) for o, _ in trajectories)
    for dynamic in (True, False):
        seen = empty = 0
        tu.assign_non_tensor(td, use_dynamic_bsz=dynamic, max_token_len_per_gpu=24, micro_batch_size_per_gpu=1)
        for mini in tu.make_iterator(td, mini_batch_size=3, epochs=1, seed=0, dataloader_kwargs={"shuffle": True}):
            tu.assign_non_tensor(mini, use_dynamic_bsz=dynamic, max_token_len_per_gpu=24, micro_batch_size_per_gpu=1)
            micro_batches, _ = prepare_micro_batches(mini)
            for micro in micro_batches:
                inputs = full_sequence_topk_inputs(micro)
                flag = inputs["is_response"].values()
                labels = torch.roll(micro["input_ids"].values(), -1)
                ids = inputs["ids"].values()[flag]
                torch.testing.assert_close(inputs["sampled"].values()[flag], labels[flag])
                generated = (ids >= 0).all(-1)
                # a generated token's first top-K id is the token its row predicts; a tool token has no entry
                torch.testing.assert_close(ids[generated][:, 0], labels[flag][generated])
                assert (ids[~generated] == -1).all()
                seen, empty = seen + int(flag.sum()), empty + int((~generated).sum())
        assert (seen, empty) == (response_tokens, tool_tokens), dynamic


def test_a_trajectory_without_rows_in_a_topk_batch_is_an_error(batch, gen):
    worker = _worker()
    output, answers = _trajectory(gen, 3, [4], 0)
    padded = [asyncio.run(_postprocess_one(worker, output, answers)) for _ in range(2)]
    del padded[1].extra_fields[rt.TOPK_IDS], padded[1].extra_fields[rt.TOPK_LOG_PROBS]
    with pytest.raises(RuntimeError, match=r"1 of 2 trajectories carry no top-K rows"):
        rt.topk_into_batch(AgentLoopWorker._postprocess)(worker, padded, input_non_tensor_batch=None)


def test_without_topk_the_wrappers_leave_verls_batch_alone(gen, monkeypatch):
    monkeypatch.delenv(rt.ENV_TOPK, raising=False)
    worker = _worker()
    output, answers = _trajectory(gen, 3, [4], 0)
    padded = [asyncio.run(_postprocess_one(worker, output, answers))]
    assert rt.TOPK_IDS not in padded[0].extra_fields
    data = rt.topk_into_batch(AgentLoopWorker._postprocess)(worker, padded, input_non_tensor_batch=None)
    assert rt.TOPK_IDS not in data.batch.keys() and rt.TOPK_IDS not in data.non_tensor_batch
