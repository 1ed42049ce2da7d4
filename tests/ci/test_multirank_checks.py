"""``ci/multirank_runs.check`` on the committed summaries of the main_ppo runs (ci/multirank/*_summary.json): they
pass, and each planted fault of a Megatron run (a rollout-vs-actor gap above the regression's bound, a step
without the gap, a CP step without the shard-local loss) is one named problem."""

import copy
import json
import os

import pytest

from ci import multirank_runs
from ci.regression_checks import DEFAULT_CHECKS
from tests.support import REPO_ROOT

SUMMARIES = os.path.join(REPO_ROOT, "ci", "multirank")


def _summary(name: str) -> dict:
    with open(os.path.join(SUMMARIES, f"{name}_summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    ("name", "unsolvable_every"),
    [("tiny_task", 0), ("unsolvable", 4), ("megatron", 0), ("megatron_unsolvable", 4)],
)
def test_the_committed_runs_pass(name, unsolvable_every):
    assert multirank_runs.check(_summary(name), steps=10, unsolvable_every=unsolvable_every) == []


def test_a_planted_megatron_fault_is_one_named_problem():
    summary = _summary("megatron")
    layouts = multirank_runs.MEGATRON_LAYOUTS
    assert all(summary[f"{layout}/cppo"][multirank_runs.GAP_MAX][3] < 1e-5 for layout in layouts)

    def problems(layout: str, key: str, step: int, value) -> list[str]:
        planted = copy.deepcopy(summary)
        planted[f"{layout}/cppo"][key][step] = value
        return multirank_runs.check(planted, steps=10, unsolvable_every=0)

    limit = DEFAULT_CHECKS["rollout_actor_prob_gap_max"]
    (gap,) = problems("mcore_tp2", multirank_runs.GAP_MAX, 3, 10 * limit)  # vLLM kept stale weights
    assert gap.startswith("mcore_tp2/cppo: rollout vs actor log-prob gap above 0.0001")
    missing = problems("mcore1", multirank_runs.GAP_MAX, 0, None)  # the probe did not report
    assert [m for m in missing if m.startswith("mcore1/cppo: the loss probe reported no rollout vs actor gap")]
    (gathered,) = problems("mcore_cp2", multirank_runs.SHARD_LOCAL, 9, None)  # CP step on the gathered path
    assert gathered.startswith("mcore_cp2/cppo: the shard-local loss did not run in every step")
