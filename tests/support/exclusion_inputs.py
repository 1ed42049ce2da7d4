"""Groups of responses as verl 0.9.1's v1 trainer hands one mini-batch to the actor, and the actor's loss on it.

``minibatch(rows)`` builds the TensorDict ``TrainingWorker.train_batch`` receives (nested prompts, responses,
response_mask, loss_mask, old_log_probs, advantages; the non-tensor ``global_batch_size`` the trainer
attaches) and the engine's nested per-token log-probs, whose per-row leaves carry the gradient.
``actor_loss`` then does what every engine's ``forward_backward_batch`` does before calling the loss (count
``batch_num_tokens`` from ``loss_mask``, all-reduced over DP) and calls verl's real ``ppo_loss``.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss

from tests.support.verl_inputs import actor_config
from verl_cppo.advantage.estimator import compute_cppo_grpo_advantage
from verl_cppo.advantage.exclusion import KEEP_FIELD, capture_exclusions


@dataclass
class Rows:
    """B responses, each with its own leaf of current log-probs (so two batches can share rows)."""

    prompt_lens: list[int]
    resp_lens: list[int]
    response_mask: list[torch.Tensor]  # [r_b] long
    old_log_probs: list[torch.Tensor]  # [r_b]
    log_prob_leaves: list[torch.Tensor]  # [r_b] requires grad
    advantages: list[torch.Tensor]  # [r_b]
    keep: torch.Tensor  # [B] bool, the estimator's decision
    uids: np.ndarray


def make_rows(group_sizes, zero_variance, seed=0, max_len=9, algo=None):
    """Groups of the given sizes; groups flagged in ``zero_variance`` get equal rewards. Advantages and keep come
    from the registered estimator ``cppo_grpo`` (defaults unless ``algo``)."""
    gen = torch.Generator().manual_seed(seed)
    uids, rewards = [], []
    for g, (size, flat) in enumerate(zip(group_sizes, zero_variance)):
        uids += [f"g{g}"] * size
        rewards += [float(torch.randint(0, 2, ()))] * size if flat else torch.randn(size, generator=gen).tolist()
    n = len(uids)
    resp_lens = torch.randint(1, max_len + 1, (n,), generator=gen).tolist()
    width = max(resp_lens)
    token_rewards = torch.zeros(n, width)
    mask = torch.zeros(n, width, dtype=torch.int64)
    for b, r in enumerate(resp_lens):
        mask[b, :r] = 1
        if r > 2:
            mask[b, 1] = int(torch.randint(0, 2, (), generator=gen))  # interior hole (multi-turn tool token)
        token_rewards[b, r - 1] = rewards[b]
    uids = np.array(uids, dtype=object)
    with capture_exclusions() as captured:
        adv, _ = compute_cppo_grpo_advantage(token_rewards, mask, uids, algo)
    keep = captured[0].keep if captured else torch.ones(n, dtype=torch.bool)
    old = [-torch.rand(r, generator=gen) * 2 - 0.05 for r in resp_lens]
    new = [
        (o + 0.3 * torch.randn(r, generator=gen)).clamp(max=-1e-3).requires_grad_(True) for o, r in zip(old, resp_lens)
    ]
    return Rows(
        prompt_lens=torch.randint(2, 6, (n,), generator=gen).tolist(),
        resp_lens=resp_lens,
        response_mask=[mask[b, :r].clone() for b, r in enumerate(resp_lens)],
        old_log_probs=old,
        log_prob_leaves=[x.requires_grad_(True) for x in new],
        advantages=[adv[b, :r].clone() for b, r in enumerate(resp_lens)],
        keep=keep,
        uids=uids,
    )


def _nested(tensors):
    return torch.nested.as_nested_tensor(list(tensors), layout=torch.jagged)


def minibatch(rows: Rows, index, *, with_keep=True, global_batch_size=None):
    """(model_output, data) for the rows ``index`` in that order, as train_batch gets them on one DP rank."""
    filler = torch.full((1,), -0.7)
    full = []
    for b in index:  # output position j predicts token j + 1: the response sits at [p - 1, p - 1 + r)
        p = rows.prompt_lens[b]
        full += [filler.expand(p - 1), rows.log_prob_leaves[b], filler]
    lengths = torch.tensor([rows.prompt_lens[b] + rows.resp_lens[b] for b in index])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    log_probs = torch.nested.nested_tensor_from_jagged(torch.cat(full), offsets=offsets)
    fields = {
        "prompts": _nested(torch.ones(rows.prompt_lens[b], dtype=torch.int64) for b in index),
        "responses": _nested(torch.ones(rows.resp_lens[b], dtype=torch.int64) for b in index),
        "response_mask": _nested(rows.response_mask[b] for b in index),
        "loss_mask": _nested(rows.response_mask[b] for b in index),  # the v1 agent loop stores a copy
        "old_log_probs": _nested(rows.old_log_probs[b] for b in index),
        "advantages": _nested(rows.advantages[b] for b in index),
    }
    if with_keep:
        fields[KEEP_FIELD] = rows.keep[list(index)]
    data = TensorDict(fields, batch_size=[len(index)])
    gbs = len(index) if global_batch_size is None else global_batch_size
    tu.assign_non_tensor(data, global_batch_size=gbs)
    return {"log_probs": log_probs}, data


def actor_loss(model_output, data, loss_agg_mode, loss_mode="cppo", dp_group=None, dp_size=1):
    """verl's ppo_loss after the engine's normaliser count (every engine: sum of loss_mask, all-reduced)."""
    batch_num_tokens = data["loss_mask"].values().sum()
    if dp_group is not None:
        torch.distributed.all_reduce(batch_num_tokens, group=dp_group)
    tu.assign_non_tensor(data, batch_num_tokens=int(batch_num_tokens), dp_size=dp_size)
    # a constant horizon for seq-mean-token-sum-norm (as the paper): the padded width depends on the batch
    config = actor_config(loss_agg_mode, loss_mode=loss_mode, loss_scale_factor=16)
    loss, _ = ppo_loss(config, model_output, data)
    return loss
