"""The CPU test probe of ppo_loss's inputs (``verl_cppo.testing.loss_probe``) on a hand-computed micro-batch."""

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from verl_cppo.testing import SWITCH_ENV, loss_probe


def test_metrics_of_a_hand_computed_micro_batch():
    data = TensorDict(
        {
            "response_mask": torch.tensor([[1, 1, 0], [0, 0, 0]]),  # row 1: an excluded response
            "old_log_probs": torch.tensor([[-1.0, -2.0, -9.0], [0.0, 0.0, 0.0]]),
            "rollout_log_probs": torch.tensor([[-1.0, -2.5, 0.0], [5.0, 5.0, 5.0]]),  # off-mask values ignored
        },
        batch_size=[2],
    )
    tu.assign_non_tensor(data, global_batch_size=63)
    current = torch.tensor([[-1.25, -2.0, 7.0], [3.0, 3.0, 3.0]])  # [b, T]
    assert loss_probe.loss_input_metrics(current, data) == {
        "actor/probe_old_vs_current_abs_max": (0.25, "max"),
        "actor/probe_old_vs_rollout_abs_max": (0.5, "max"),
        "actor/probe_zeroed_rows": (1.0, "sum"),
        "actor/probe_global_batch_size": (63.0, "min"),
    }


def test_the_probe_needs_the_cpu_test_switch(monkeypatch):
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"needs {SWITCH_ENV}=1"):
        loss_probe.install()


def test_rollout_gap_of_a_hand_computed_micro_batch():
    log_prob = torch.tensor([[-1.0, -2.25, 4.0], [-0.5, 0.0, 0.0]])  # [b, T]
    mu = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 9.0, 9.0]])  # [b, T]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # off-mask differences (4 and 9) ignored
    assert loss_probe.rollout_gap_metrics(log_prob, mu, mask) == {
        "actor/probe_rollout_gap_abs_max": (0.5, "max"),
        "actor/probe_rollout_gap_abs_mean": (0.25, "mean"),  # (0.5 + 0.25 + 0) / 3 tokens
    }


def test_the_rollout_gap_is_reported_on_the_first_mini_batch_of_a_step_only():
    """``train_mini_batch`` (one step's update) opens the window, the end of its first ``train_batch`` closes it;
    ``loss_input_metrics`` reports the gap only inside (mu from ``rollout_log_probs``)."""
    data = TensorDict(
        {
            "response_mask": torch.tensor([[1, 1]]),
            "old_log_probs": torch.tensor([[-1.0, -1.0]]),
            "rollout_log_probs": torch.tensor([[-1.0, -3.0]]),
        },
        batch_size=[1],
    )
    current = torch.tensor([[-1.0, -1.5]])  # [b, T]
    seen = []

    class Worker:
        def train_batch(self, mini_batch):
            seen.append(loss_probe.GAP_KEYS[0] in loss_probe.loss_input_metrics(current, data))
            if len(seen) == 1:
                assert loss_probe.loss_input_metrics(current, data)[loss_probe.GAP_KEYS[0]] == (1.5, "max")

        def train_mini_batch(self, mini_batches):
            for mini_batch in mini_batches:
                self.train_batch(mini_batch)

    Worker.train_batch = loss_probe._closes_first_mini_batch(Worker.train_batch)
    Worker.train_mini_batch = loss_probe._opens_step(Worker.train_mini_batch)
    Worker().train_mini_batch(range(3))
    Worker().train_mini_batch(range(2))
    assert seen == [True, False, False, True, False]
    assert loss_probe.GAP_KEYS[0] not in loss_probe.loss_input_metrics(current, data)  # outside any update
