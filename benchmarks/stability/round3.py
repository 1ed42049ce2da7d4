"""The third round's outcomes and comparisons (README, "Third round"), fixed before its seeds ran.

Per run, from its per-step ``rewards`` and ``grad_norm`` (results.json fields, one value per step):

* the **smoothed reward** m_s = mean of the rewards of steps s-2..s (s >= 3): one step's mean over 128 samples
  is noisy; the **reward at fixed steps** is m_s at REWARD_STEPS (and at the last step: the final reward);
* the **instability onset** (``onset``): the first step s with
    - a drop: m_s < max_{3 <= u < s} m_u - DROP (the run fell DROP below the best it had reached), or
    - a freeze: the gradient norm stays below GRAD from step s to the last step N, for at least FREEZE_MIN
      steps, while m_N < SOLVED (the policy became deterministic short of solving the task: every group's
      samples score the same, GRPO's advantages are 0, and the run can never move again);
  whichever comes first. A run with neither is censored: its onset is N + 1 and ``event`` is False.
  DROP = 0.2 and GRAD = 1e-3 are the primary thresholds; SENSITIVITY repeats the counts and tests over
  DROP in {0.1, 0.2, 0.3} x GRAD in {1e-4, 1e-3, 1e-2}.

Paired comparisons (``stats.py``, exact, two-sided) over the seeds both arms completed: the final reward, m_s
at PRIMARY_STEP and the onset step (censored runs at N + 1; under the null the two arms are exchangeable within
a seed, so the sign-flip test stays exact for any per-seed function of the pair, censoring included) by the
sign-flip test, the event by the exact McNemar test.
"""

from __future__ import annotations

import statistics

from benchmarks.stability import stats

COMPARISONS = (
    ("cppo", "cppo_permuted_prefix"),
    ("cppo", "dppo_tv_matched"),
    ("cppo_permuted_prefix", "dppo_tv_matched"),
)
"""The first is the primary one: the budget in causal order against the same budget in a random order."""
WINDOW = 3
DROP = 0.2
GRAD = 1e-3
FREEZE_MIN = 3
SOLVED = 0.95
SENSITIVITY = tuple((drop, grad) for drop in (0.1, 0.2, 0.3) for grad in (1e-4, 1e-3, 1e-2))
REWARD_STEPS = (10, 20, 30, 40)
"""Steps at which m_s is reported (those a run reaches); the final reward is m_N."""
PRIMARY_STEP = 20
"""The fixed step whose m_s is a primary outcome (mid-learning: the calibration's vanilla and cppo runs were at
0.6-0.8 there), beside the final reward and the onset."""
EARLY_STEPS = 10
"""The steps over which dppo_tv_matched's delta is matched to cppo's masked fraction (README: calibration)."""


def smoothed(rewards: list[float]) -> list[float]:
    """[N] -> [N - WINDOW + 1]: entry i is m_{i + WINDOW} (1-based steps), the mean of WINDOW rewards."""
    return [statistics.fmean(rewards[i - WINDOW + 1 : i + 1]) for i in range(WINDOW - 1, len(rewards))]


def onset(rewards: list[float], grad_norms: list[float], drop: float = DROP, grad: float = GRAD) -> tuple[int, bool]:
    """(onset step, event) as defined above; (N + 1, False) when the run never became unstable."""
    n = len(rewards)
    if len(grad_norms) != n or n < WINDOW:
        raise ValueError(f"onset needs >= {WINDOW} steps of rewards and grad norms, got {n} and {len(grad_norms)}")
    m = smoothed(rewards)
    first = n + 1
    best = m[0]
    for i in range(1, len(m)):
        if m[i] < best - drop:
            first = i + WINDOW  # 1-based step of m[i]
            break
        best = max(best, m[i])
    if m[-1] < SOLVED:
        frozen_from = n + 1
        for step in range(n, 0, -1):  # the longest frozen tail
            if grad_norms[step - 1] >= grad:
                break
            frozen_from = step
        if n - frozen_from + 1 >= FREEZE_MIN:
            first = min(first, frozen_from)
    return first, first <= n


def run_outcomes(entry: dict) -> dict:
    """One results.json entry -> its round-3 outcomes."""
    rewards, grads = entry["rewards"], entry["grad_norm"]
    m = smoothed(rewards)
    step, event = onset(rewards, grads)
    out = {
        "final_reward": m[-1],
        "reward_at": {s: m[s - WINDOW] for s in REWARD_STEPS if WINDOW <= s <= len(rewards)},
        "onset": step,
        "unstable": event,
        "masked_frac_early": statistics.fmean(entry["masked_frac"][:EARLY_STEPS]),
    }
    for drop, grad in SENSITIVITY:
        out[f"onset@{drop},{grad}"] = onset(rewards, grads, drop, grad)
    return out


def paired(a: dict[int, dict], b: dict[int, dict], drop: float = DROP, grad: float = GRAD) -> dict:
    """Arm A against arm B (seed -> ``run_outcomes``) on the seeds both have, at one pair of thresholds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"seeds": []}
    key = f"onset@{drop},{grad}"
    final = [a[s]["final_reward"] - b[s]["final_reward"] for s in seeds]  # [n] A - B
    mid = [a[s]["reward_at"][PRIMARY_STEP] - b[s]["reward_at"][PRIMARY_STEP] for s in seeds]  # [n] A - B
    onsets = [a[s][key][0] - b[s][key][0] for s in seeds]  # [n] A - B, later onset = positive
    only_a = sum(a[s][key][1] and not b[s][key][1] for s in seeds)
    only_b = sum(b[s][key][1] and not a[s][key][1] for s in seeds)
    return {
        "seeds": seeds,
        "final_reward_diff_mean": statistics.fmean(final),
        "final_reward_p": stats.sign_flip_p(final),
        f"reward_at_{PRIMARY_STEP}_diff_mean": statistics.fmean(mid),
        f"reward_at_{PRIMARY_STEP}_p": stats.sign_flip_p(mid),
        "onset_diff_mean": statistics.fmean(onsets),
        "onset_p": stats.sign_flip_p(onsets),
        "unstable_a": sum(a[s][key][1] for s in seeds),
        "unstable_b": sum(b[s][key][1] for s in seeds),
        "unstable_only_a": only_a,
        "unstable_only_b": only_b,
        "unstable_p": stats.mcnemar_exact_p(only_a, only_b),
    }


def summarize(completed: dict[str, list[dict]]) -> dict:
    """Per arm and seed the outcomes; the COMPARISONS at the primary thresholds and over SENSITIVITY."""
    per_arm = {arm: {e["seed"]: run_outcomes(e) for e in done} for arm, done in completed.items() if done}
    comparisons = {}
    for arm_a, arm_b in COMPARISONS:
        if arm_a in per_arm and arm_b in per_arm:
            name = f"{arm_a} vs {arm_b}"
            comparisons[name] = paired(per_arm[arm_a], per_arm[arm_b])
            comparisons[name]["sensitivity"] = {
                f"{drop},{grad}": paired(per_arm[arm_a], per_arm[arm_b], drop, grad) for drop, grad in SENSITIVITY
            }
    return {"arms": per_arm, "comparisons": comparisons}


def arm_table(per_arm: dict[str, dict[int, dict]], masked: dict[str, float]) -> str:
    """Per arm: runs, final reward mean ± sd and min, m_s at REWARD_STEPS (mean), unstable runs, onsets of
    the unstable runs, the masked fraction over the first EARLY_STEPS steps and over the run (``masked``)."""
    lines = [
        "| arm | runs | final reward mean ± sd | min | "
        + " | ".join(f"reward at step {s}" for s in REWARD_STEPS)
        + " | unstable | onset steps (unstable runs) | masked frac, steps 1-10 / all |",
        "|---|---|---|---|" + "---|" * len(REWARD_STEPS) + "---|---|---|",
    ]
    for arm, runs in per_arm.items():
        finals = [r["final_reward"] for r in runs.values()]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        at = [[r["reward_at"][s] for r in runs.values() if s in r["reward_at"]] for s in REWARD_STEPS]
        onsets = sorted(r["onset"] for r in runs.values() if r["unstable"])
        early = statistics.fmean(r["masked_frac_early"] for r in runs.values())
        lines.append(
            f"| {arm} | {len(runs)} | {statistics.fmean(finals):.3f} ± {sd:.3f} | {min(finals):.3f} | "
            + " | ".join(f"{statistics.fmean(v):.3f}" if v else "" for v in at)
            + f" | {len(onsets)}/{len(runs)} | {', '.join(map(str, onsets)) or '-'} | {early:.4f} / "
            f"{masked.get(arm, float('nan')):.4f} |"
        )
    return "\n".join(lines)


def comparison_table(comparisons: dict) -> str:
    """The COMPARISONS at the primary thresholds."""
    lines = [
        f"| A vs B | seeds | final reward A - B, p | reward at step {PRIMARY_STEP} A - B, p | onset A - B (steps), p "
        "| unstable A / B (only A, only B), p |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in comparisons.items():
        if not c["seeds"]:
            continue
        lines.append(
            f"| {name} | {len(c['seeds'])} | {c['final_reward_diff_mean']:+.3f}, {c['final_reward_p']:.3f} "
            f"| {c[f'reward_at_{PRIMARY_STEP}_diff_mean']:+.3f}, {c[f'reward_at_{PRIMARY_STEP}_p']:.3f} "
            f"| {c['onset_diff_mean']:+.1f}, {c['onset_p']:.3f} | {c['unstable_a']} / {c['unstable_b']} "
            f"({c['unstable_only_a']}, {c['unstable_only_b']}), {c['unstable_p']:.3f} |"
        )
    return "\n".join(lines)


def sensitivity_table(comparisons: dict) -> str:
    """Unstable counts and the onset p-value of every comparison over the SENSITIVITY grid."""
    lines = ["| A vs B | DROP | GRAD | unstable A / B | onset A - B, p | unstable p |", "|---|---|---|---|---|---|"]
    for name, c in comparisons.items():
        for key, s in c.get("sensitivity", {}).items():
            drop, grad = key.split(",")
            lines.append(
                f"| {name} | {drop} | {grad} | {s['unstable_a']} / {s['unstable_b']} "
                f"| {s['onset_diff_mean']:+.1f}, {s['onset_p']:.3f} | {s['unstable_p']:.3f} |"
            )
    return "\n".join(lines)
