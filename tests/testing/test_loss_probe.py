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
