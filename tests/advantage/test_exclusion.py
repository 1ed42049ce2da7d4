"""Excluded (zero-variance) groups change neither the loss nor the gradient of the other groups, through verl's
real ppo_loss and agg_loss in every loss_agg_mode, on one and on two (gloo) DP ranks; and the hooks that carry
the exclusion sit on verl's real trainer and worker code."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from verl.single_controller.base.decorator import MAGIC_ATTR
from verl.utils import tensordict_utils as tu

from tests.support import REPO_ROOT
from tests.support.exclusion_inputs import actor_loss, make_rows, minibatch
from tests.support.float32_bounds import UNIT_ROUNDOFF, reorder_bound
from tests.support.verl_inputs import AGG_MODES
from verl_cppo.advantage.exclusion import (
    KEEP_FIELD,
    GroupExclusion,
    capture_exclusions,
    exclude_responses,
    exclusion_metrics,
    publish_exclusion,
)
from verl_cppo.hooks import HOOK_MARK
from verl_cppo.hooks.post_import import when_imported

ROOT = REPO_ROOT
GROUPS = [4, 3, 4, 1, 4, 2, 4]  # sizes; index 3 is a single-response group
FLAT = [False, True, False, True, False, False, True]  # equal rewards (zero variance)
DENOMINATED = [m for m in AGG_MODES if m != "token-sum"]  # token-sum has no normaliser to dilute


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=False)


@pytest.mark.parametrize("loss_mode", ["cppo", "vanilla"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_excluded_groups_change_neither_loss_nor_gradient_of_the_others(agg, loss_mode):
    rows = make_rows(GROUPS, FLAT, seed=3)
    everyone = list(range(len(rows.uids)))
    kept = [b for b in everyone if rows.keep[b]]
    excluded = [b for b in everyone if not rows.keep[b]]
    assert len(excluded) == 3 + 1 + 4 and len(kept) == len(everyone) - 8

    # the mini-batch the actor gets (excluded rows inside), after the worker hook
    out, data = minibatch(rows, everyone)
    tokens, n_excluded = exclude_responses(data)
    assert n_excluded == 8 and tokens == sum(int(rows.response_mask[b].sum()) for b in kept)
    assert tu.get_non_tensor_data(data, "global_batch_size", None) == len(kept)
    loss = actor_loss(out, data, agg, loss_mode)
    grads = _grads(loss, [rows.log_prob_leaves[b] for b in everyone])

    # reference: the same kept rows in a batch that never contained the excluded groups
    ref_out, ref_data = minibatch(rows, kept, with_keep=False)
    ref_loss = actor_loss(ref_out, ref_data, agg, loss_mode)
    ref_grads = _grads(ref_loss, [rows.log_prob_leaves[b] for b in kept])

    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for b, g in zip(everyone, grads):
        if rows.keep[b]:
            torch.testing.assert_close(g, ref_grads[kept.index(b)], rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(g, torch.zeros_like(g)), f"excluded row {b} got gradient {g}"

    # verl's behaviour without the exclusion (grpo: advantage 0, still counted) dilutes the other groups
    plain_out, plain_data = minibatch(rows, everyone, with_keep=False)
    plain_loss = actor_loss(plain_out, plain_data, agg, loss_mode)
    if agg in DENOMINATED:
        assert not torch.allclose(plain_loss, ref_loss, rtol=1e-3, atol=0)
    else:
        torch.testing.assert_close(plain_loss, ref_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_mode", ["cppo", "vanilla"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_a_wholly_excluded_minibatch_gives_zero_loss_and_gradient(agg, loss_mode):
    rows = make_rows([3, 1, 5], [True, True, True], seed=5)
    everyone = list(range(len(rows.uids)))
    assert not rows.keep.any()
    out, data = minibatch(rows, everyone)
    loss_mask_before = data["loss_mask"].values().clone()
    assert exclude_responses(data) == (0, len(everyone))
    assert torch.equal(data["loss_mask"].values(), loss_mask_before)  # verl's denominators kept: no 0 / 0
    assert tu.get_non_tensor_data(data, "global_batch_size", None) == len(everyone)
    assert not data["response_mask"].values().any()
    loss = actor_loss(out, data, agg, loss_mode)
    assert torch.isfinite(loss) and loss.item() == 0.0
    for g in _grads(loss, rows.log_prob_leaves):
        assert torch.equal(g, torch.zeros_like(g))


def test_dense_masks_v0_layout():
    """The v0 trainer hands dense [B, T] loss_mask / response_mask (left_right_2_no_padding)."""
    from tensordict import TensorDict

    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 0, 0]])
    data = TensorDict(
        {"loss_mask": mask.clone(), "response_mask": mask.clone(), KEEP_FIELD: torch.tensor([1, 0, 1, 0]).bool()},
        batch_size=[4],
    )
    tu.assign_non_tensor(data, global_batch_size=4)
    assert exclude_responses(data) == (5, 2)
    expected = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
    assert torch.equal(data["loss_mask"], expected) and torch.equal(data["response_mask"], expected)
    assert tu.get_non_tensor_data(data, "global_batch_size", None) == 2
    del data["loss_mask"]
    with pytest.raises(KeyError, match=r"carries cppo_grpo_keep but no \['loss_mask'\]"):
        exclude_responses(data)


def test_v0_batch_through_verls_own_conversion():
    """v0: the call-site hook stores KEEP_FIELD in the DataProto; verl's _update_actor conversion carries it to
    the worker next to loss_mask, where the worker hook removes the excluded rows."""
    import numpy as np
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.workers.utils.padding import left_right_2_no_padding

    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.2])
    response_mask = torch.ones(6, 4, dtype=torch.int64)
    batch = DataProto.from_dict(
        tensors={
            "token_level_rewards": rewards,
            "response_mask": response_mask,
            "input_ids": torch.ones(6, 7, dtype=torch.int64),
            "attention_mask": torch.ones(6, 7, dtype=torch.int64),
            "position_ids": torch.arange(7).expand(6, 7).clone(),
        },
        non_tensors={"uid": np.array(["a", "a", "b", "b", "c", "c"], dtype=object)},
    )
    batch = compute_advantage(batch, adv_estimator="cppo_grpo")
    assert batch.batch[KEEP_FIELD].tolist() == [True, True, False, False, True, True]
    td = left_right_2_no_padding(batch.to_tensordict())  # what RayPPOTrainer._update_actor does
    tu.assign_non_tensor(td, global_batch_size=6)
    exclude_responses(td)
    assert td["loss_mask"].sum(-1).tolist() == [4, 4, 0, 0, 4, 4]
    assert tu.get_non_tensor_data(td, "global_batch_size", None) == 4
    assert batch.batch["response_mask"].sum().item() == 24  # the trainer's batch (metrics) is untouched


def test_capture_is_scoped_and_nestable():
    ex = GroupExclusion(keep=torch.tensor([True, False]), num_groups=2, num_excluded_groups=1)
    publish_exclusion(ex)  # outside any trainer: goes nowhere
    with capture_exclusions() as outer:
        with capture_exclusions() as inner:
            publish_exclusion(ex)
        publish_exclusion(ex)
    assert len(inner) == 1 and len(outer) == 2
    assert exclusion_metrics(ex) == {"cppo_grpo/excluded_group_frac": 0.5, "cppo_grpo/excluded_response_frac": 0.5}


# ------------------------------------------------------------------------------------ the hooks in verl


def test_hooks_sit_on_verls_trainer_and_worker_code():
    import verl.trainer.ppo.ray_trainer as v0
    import verl.trainer.ppo.v1.trainer_base as v1
    import verl.workers.engine_workers as workers

    for fn in (v0.compute_advantage, v1.PPOTrainer._compute_advantage, workers.TrainingWorker.train_batch):
        assert getattr(fn, HOOK_MARK, False), fn
        assert not getattr(fn.__wrapped__, HOOK_MARK, False)  # wrapped exactly once
        assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)
    # Ray's worker groups dispatch train_batch by the attributes of verl's @register: still there
    assert getattr(workers.TrainingWorker.train_batch, MAGIC_ATTR) == getattr(
        workers.TrainingWorker.train_batch.__wrapped__, MAGIC_ATTR
    )


def test_when_imported_runs_after_import_and_at_once_if_imported(tmp_path, monkeypatch):
    (tmp_path / "cppo_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("cppo_probe_module", lambda m: seen.append(("late", m.VALUE)))
    assert seen == []
    import cppo_probe_module

    assert seen == [("late", 1)]
    when_imported("cppo_probe_module", lambda m: seen.append(("now", m.VALUE)))
    assert seen == [("late", 1), ("now", 1)] and cppo_probe_module.VALUE == 1
    monkeypatch.delitem(sys.modules, "cppo_probe_module")


HOOKED = [  # cppo_grpo's three hooks, and the legacy trainer's bypass anchor (verl_cppo.trainer.bypass_anchor)
    "verl.trainer.ppo.ray_trainer",
    "verl.trainer.ppo.rollout_corr_helper",
    "verl.trainer.ppo.v1.trainer_base",
    "verl.workers.engine_workers",
]


def test_plugin_defers_the_hooks_to_the_first_import():
    """In a new process (e.g. a Ray worker), ``import verl`` loads the plugin without importing the heavy
    trainer and worker modules; their hooks wait for verl to import them (see the in-process test above)."""
    code = textwrap.dedent(
        f"""
        import sys, verl
        from verl_cppo.hooks.post_import import _PENDING
        print([m for m in {HOOKED!r} if m in sys.modules], sorted(_PENDING))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"[] {sorted(HOOKED)!r}"


# ------------------------------------------------------------------------- the v1 trainer (TransferQueue)


class InMemoryKV:
    """TransferQueue 0.1.11's kv_batch_put / kv_batch_get semantics on a dict (its service needs Ray actors):
    values stored per sample; on get, scalars stack densely to [B], other tensors to jagged nested tensors,
    anything else to a NonTensorStack (transfer_queue/storage/managers/base.py)."""

    def __init__(self):
        self.samples = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from tensordict.tensorclass import NonTensorStack
        from transfer_queue import KVBatchMeta

        for name, column in fields.items():
            values = column.tolist() if isinstance(column, NonTensorStack) else column.unbind(0)
            for key, value in zip(keys, values):
                self.samples.setdefault((partition_id, key), {})[name] = value
        names = sorted(set.intersection(*(set(self.samples[(partition_id, k)]) for k in keys)))
        return KVBatchMeta(keys=list(keys), tags=[{}] * len(keys), partition_id=partition_id, fields=names)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from tensordict import TensorDict
        from tensordict.tensorclass import NonTensorStack

        stored = [self.samples[(partition_id, k)] for k in keys]
        out = {}
        for name in select_fields or list(stored[0]):
            if name not in stored[0]:
                continue
            chunk = [s[name] for s in stored]
            if not all(isinstance(v, torch.Tensor) for v in chunk):
                out[name] = NonTensorStack(*chunk)
            elif all(v.dim() == 0 for v in chunk):
                out[name] = torch.stack(chunk)
            else:
                out[name] = torch.nested.as_nested_tensor(chunk, layout=torch.jagged)
        return TensorDict(out, batch_size=[len(keys)])


def test_v1_trainer_stores_the_keep_field_next_to_advantages(monkeypatch):
    """verl's real PPOTrainer._compute_advantage (hooked) on a composed config, with TransferQueue's key-value
    calls served from memory: the actor then gets KEEP_FIELD with the advantages, and the metrics are logged."""
    import types

    import numpy as np
    import transfer_queue
    from tensordict import TensorDict
    from tensordict.tensorclass import NonTensorStack
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from tests.support.advantage_reference import reference_cppo_grpo
    from tests.support.verl_hydra import compose_trainer

    kv = InMemoryKV()
    monkeypatch.setattr(transfer_queue, "kv_batch_put", kv.kv_batch_put)
    monkeypatch.setattr(transfer_queue, "kv_batch_get", kv.kv_batch_get)

    uids = ["a"] * 4 + ["b"] * 4 + ["c"] * 2 + ["d"]
    scores = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.3, 0.7, 0.5]
    lengths = [3, 5, 2, 4, 6, 1, 3, 2, 4, 5, 2]
    rm_scores = [torch.zeros(n) for n in lengths]
    for r, s in zip(rm_scores, scores):
        r[-1] = s
    keys = [f"{u}_0_{i}" for i, u in enumerate(uids)]
    ones = [torch.ones(n, dtype=torch.int64) for n in lengths]
    rollout = TensorDict(
        {
            "uid": NonTensorStack(*uids),
            "rm_scores": torch.nested.as_nested_tensor(rm_scores, layout=torch.jagged),
            "response_mask": torch.nested.as_nested_tensor(ones, layout=torch.jagged),
            "loss_mask": torch.nested.as_nested_tensor(ones, layout=torch.jagged),
        },
        batch_size=[len(keys)],
    )
    batch = transfer_queue.kv_batch_put(keys=keys, partition_id="train", fields=rollout)

    trainer = types.SimpleNamespace(config=compose_trainer("dp", ["algorithm.adv_estimator=cppo_grpo"]))
    metrics = {}
    batch = PPOTrainer._compute_advantage(trainer, batch, metrics)

    ref_adv, ref_kept = reference_cppo_grpo(scores, np.array(uids, dtype=object))
    assert {"advantages", "returns", KEEP_FIELD} <= set(batch.fields)
    got = transfer_queue.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages", KEEP_FIELD])
    assert got[KEEP_FIELD].tolist() == ref_kept
    for row, adv, n in zip(got["advantages"].unbind(), ref_adv, lengths):
        torch.testing.assert_close(row, torch.full((n,), adv), rtol=1e-6, atol=1e-7)
    assert metrics == {"cppo_grpo/excluded_group_frac": 2 / 4, "cppo_grpo/excluded_response_frac": 5 / 11}

    # what train_batch then does with the fetched mini-batch
    mini = transfer_queue.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["loss_mask", KEEP_FIELD])
    mini["response_mask"] = mini["loss_mask"].clone()
    tu.assign_non_tensor(mini, global_batch_size=len(keys))
    assert exclude_responses(mini) == (sum(n for n, k in zip(lengths, ref_kept) if k), 5)
    assert tu.get_non_tensor_data(mini, "global_batch_size", None) == 6


# ----------------------------------------------------------------------------------- two DP ranks (gloo)

DP_GROUPS, DP_FLAT = [4, 4, 2, 4, 1, 4], [True, False, False, True, True, False]

RANK_SCRIPT = """
import datetime, json, os, sys
import torch
from tests.support.exclusion_inputs import actor_loss, make_rows, minibatch
from tests.support.verl_inputs import AGG_MODES
from verl_cppo.advantage.exclusion import exclude_responses

rank, (store, shards, outfile, groups, flat) = int(os.environ["RANK"]), json.loads(sys.argv[1])
torch.distributed.init_process_group(
    "gloo", init_method="file://" + store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
)
group = torch.distributed.group.WORLD
rows = make_rows(groups, flat, seed=9)
shard = shards[rank]
results = {}
for agg in AGG_MODES:
    out, data = minibatch(rows, shard, global_batch_size=len(rows.uids))
    results["counts"] = exclude_responses(data, dp_group=group)
    loss = actor_loss(out, data, agg, dp_group=group, dp_size=2)
    grads = torch.autograd.grad(loss, [rows.log_prob_leaves[b] for b in shard])
    results[agg] = {"loss": loss.item(), "grads": [g.tolist() for g in grads]}
with open(outfile + str(rank), "w") as f:
    json.dump(results, f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_dp_ranks_match_the_batch_without_excluded_groups(tmp_path):
    """Rank 0 holds most excluded rows, rank 1 few: both must divide by the global kept counts. DDP averages
    the ranks' gradients, so (loss_0 + loss_1) / 2 and grad_r / 2 must equal the single-process reference."""
    rows = make_rows(DP_GROUPS, DP_FLAT, seed=9)
    n = len(rows.uids)
    excluded = [b for b in range(n) if not rows.keep[b]]
    kept = [b for b in range(n) if rows.keep[b]]
    shards = [excluded[:7] + kept[:2], excluded[7:] + kept[2:]]
    assert sorted(shards[0] + shards[1]) == list(range(n)) and len(shards[0]) != len(shards[1])

    args = json.dumps([str(tmp_path / "store"), shards, str(tmp_path / "rank"), DP_GROUPS, DP_FLAT])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, args],
            env={**os.environ, "RANK": str(r)},
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(errors)
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]

    kept_tokens = sum(int(rows.response_mask[b].sum()) for b in kept)
    assert ranks[0]["counts"] == ranks[1]["counts"] == [kept_tokens, len(excluded)]
    for agg in AGG_MODES:
        ref_out, ref_data = minibatch(rows, kept, with_keep=False)
        ref_loss = actor_loss(ref_out, ref_data, agg)
        ref_grads = dict(zip(kept, _grads(ref_loss, [rows.log_prob_leaves[b] for b in kept])))
        # float32; the ranks see whole rows, so each token's coefficient comes from the same arithmetic but for
        # its normaliser (the same global counts, dp_size and / 2 exact): <= 10 u apart per token (u = 2^-24).
        # The loss is a sum over the kept tokens in another order (two ranks, then their mean): reorder_bound
        # of the n tokens, scaled by sum |L_t| = sum |grad_t log pi_t| (linear in log pi). 2x margin on both.
        # An excluded row counted, or a local count, moves them by >= 1 / n.
        per_token = 2 * 10 * UNIT_ROUNDOFF
        leaves = rows.log_prob_leaves
        abs_loss = sum(float((ref_grads[b].double() * leaves[b].detach().double()).abs().sum()) for b in kept)
        loss_tol = 2 * (reorder_bound(kept_tokens, 1.0) + per_token) * abs_loss
        mean_loss = (ranks[0][agg]["loss"] + ranks[1][agg]["loss"]) / 2
        assert mean_loss == pytest.approx(ref_loss.item(), rel=0, abs=loss_tol), agg
        for shard, rank in zip(shards, ranks):
            for b, g in zip(shard, rank[agg]["grads"]):
                g = torch.tensor(g) / 2  # DDP / FSDP average over the 2 ranks
                expected = ref_grads[b] if b in ref_grads else torch.zeros_like(g)
                torch.testing.assert_close(g, expected, rtol=2 * per_token, atol=0)


def test_every_epoch_of_verls_minibatch_iterator_sees_the_nominal_count():
    """train_mini_batch re-slices the batch with tu.make_iterator for each of ppo_epochs: the hook must not
    subtract twice (it edits the mini-batch, never the batch it was sliced from)."""
    rows = make_rows([4, 4, 4, 4], [True, False, True, False], seed=2)
    _, data = minibatch(rows, list(range(16)), global_batch_size=8)  # verl: ppo_mini_batch_size * n
    seen = []
    for mini in tu.make_iterator(data, mini_batch_size=8, epochs=3, seed=0, dataloader_kwargs={"shuffle": True}):
        _, excluded = exclude_responses(mini)
        seen.append(tu.get_non_tensor_data(mini, "global_batch_size", None) + excluded)
        assert int(_row_sums_of(mini)[~mini[KEEP_FIELD]].sum()) == 0
    assert seen == [8] * 6
    assert tu.get_non_tensor_data(data, "global_batch_size", None) == 8
    assert int(data["loss_mask"].values().sum()) == sum(int(m.sum()) for m in rows.response_mask)


def _row_sums_of(mini):
    return torch.stack([m.sum() for m in mini["loss_mask"].unbind()])
