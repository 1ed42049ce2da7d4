"""mu's top-K rows travel from the agent loop to the actor's micro-batches with verl's and TransferQueue's
real data functions, and reach the engine hook aligned with each response:

AgentLoopOutput.as_dict + response_topk_fields (one TQ put per trajectory, verl's list_of_dict_to_tensordict)
-> per-sample storage -> TransferQueue's AsyncSimpleStorageManager._pack_field_values (the get side)
-> verl's make_iterator (shuffled mini-batches) and prepare_micro_batches (dynamic and fixed size)
-> full_sequence_topk_inputs. (Padding samples: tests/topk/test_topk_diffs.py.)
"""

import pytest
import torch
from transfer_queue.storage.managers.simple_storage_manager import AsyncSimpleStorageManager
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
from verl.utils import tensordict_utils as tu
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.engine.utils import prepare_micro_batches

from verl_cppo.topk import rollout as rt
from verl_cppo.topk.engine_hook import full_sequence_topk_inputs

K = 3


def _trajectory_record(gen, uid, prompt_len, resp_len):
    """What AgentLoopWorkerTQ._agent_loop_postprocess puts for one single-turn trajectory (patched)."""
    prompt = torch.randint(0, 50, (prompt_len,), generator=gen).tolist()
    response = torch.randint(0, 50, (resp_len,), generator=gen).tolist()
    ids = torch.randint(0, 50, (resp_len, K), generator=gen).int()
    ids[:, 0] = torch.tensor(response)  # row t's first top-K id is response token t: alignment is visible
    lps = -torch.rand(resp_len, K, generator=gen)
    answer = rt.Generation(prompt_len, response, ids.numpy(), lps.numpy())
    output = AgentLoopOutput(
        prompt_ids=prompt,
        response_ids=response,
        response_mask=[1] * resp_len,
        response_logprobs=lps[:, 0].tolist(),
        metrics=AgentLoopMetrics(),
    )
    with rt.generation_recorder() as recorded:
        recorded.append(answer)
        field = output.as_dict()
        field.update(rt.response_topk_fields(output, k=K))
    field.pop("extra_fields")
    field["input_ids"] = torch.cat([field["prompts"], field["responses"]])
    field["old_log_probs"] = field["rollout_log_probs"]
    field["uid"] = uid
    return list_of_dict_to_tensordict([field])


def _stored_and_fetched(records):
    """Per-sample values as TQ storage keeps them, packed again as TQ's get returns a batch."""
    keys = [k for k in records[0].keys() if k != "uid"]
    batch = {key: AsyncSimpleStorageManager._pack_field_values([r[key][0] for r in records]) for key in keys}
    return batch


def test_topk_rows_reach_the_engine_aligned(gen):
    lengths = [(4, 6), (2, 1), (7, 3), (3, 8), (5, 2), (2, 5)]
    records = [_trajectory_record(gen, f"u{i}", p, r) for i, (p, r) in enumerate(lengths)]
    assert records[0][rt.TOPK_IDS].shape == (1, 6, K)  # one trajectory per put: dense [1, T, K]
    fetched = _stored_and_fetched(records)
    ids = fetched[rt.TOPK_IDS]
    assert ids.is_nested and ids.dtype == torch.int32 and ids.values().shape == (sum(r for _, r in lengths), K)
    from tensordict import TensorDict

    data = TensorDict(fetched, batch_size=[len(lengths)])
    tu.assign_non_tensor(data, use_dynamic_bsz=True, max_token_len_per_gpu=16)
    mini_batches = list(
        tu.make_iterator(data, mini_batch_size=3, epochs=1, seed=0, dataloader_kwargs={"shuffle": True})
    )
    seen = 0
    for mini in mini_batches:
        for dynamic in (True, False):
            tu.assign_non_tensor(mini, use_dynamic_bsz=dynamic, micro_batch_size_per_gpu=1)
            micro_batches, _ = prepare_micro_batches(mini)
            for micro in micro_batches:
                inputs = full_sequence_topk_inputs(micro)
                flag = inputs["is_response"].values()
                labels = torch.roll(micro["input_ids"].values(), -1)
                # the first top-K id of every response row is the token that row predicts
                torch.testing.assert_close(inputs["ids"].values()[flag][:, 0], labels[flag])
                torch.testing.assert_close(inputs["sampled"].values()[flag], labels[flag])
                seen += int(flag.sum()) if dynamic else 0
    assert seen == sum(r for _, r in lengths)


@pytest.mark.parametrize("k", [20])
def test_bytes_per_token(k):
    """What README states: K int32 ids + K float32 log-probs per response token."""
    record = {rt.TOPK_IDS: torch.full((1, k), -1, dtype=torch.int32), rt.TOPK_LOG_PROBS: torch.zeros(1, k)}
    assert sum(t.element_size() * t.numel() for t in record.values()) == 8 * k == 160
