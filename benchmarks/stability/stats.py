"""Exact small-sample tests for the stability study's paired comparisons (pure Python, no SciPy).

Every arm runs on the same seeds (same initialisation, data order, rollout seeds), so two arms are compared
seed by seed:

* a continuous outcome (final reward, worst drawdown) by the **paired sign-flip test**: under the null
  hypothesis that the two arms are exchangeable within a seed, each per-seed difference is as likely to have
  either sign; the two-sided p-value is the share of all 2^n sign assignments whose |sum| is at least the
  observed |sum| (exact enumeration: n <= 20 here);
* a binary outcome (locked in or not) by the **exact McNemar test**: only the discordant seeds (one arm
  locked, the other not) carry information; under the null each is equally likely to go either way, so the
  two-sided p-value is the binomial tail of the smaller count, doubled and capped at 1.
"""

from __future__ import annotations

import itertools
import math

SUM_TOLERANCE = 1e-12
"""Assignments whose |sum| equals the observed one up to float rounding count as "at least as extreme"."""


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided exact p-value of the paired sign-flip test on the mean of ``differences`` (one per seed).

    ``differences``: [n] per-seed differences (arm A minus arm B), n >= 1 and at most 20.
    """
    n = len(differences)
    if not 1 <= n <= 20:
        raise ValueError(f"sign_flip_p needs 1..20 paired differences, got {n}")
    if any(not math.isfinite(d) for d in differences):
        raise ValueError(f"sign_flip_p: non-finite difference in {differences}")
    observed = abs(sum(differences))
    extreme = sum(
        abs(sum(s * d for s, d in zip(signs, differences))) >= observed - SUM_TOLERANCE
        for signs in itertools.product((1, -1), repeat=n)
    )
    return extreme / 2**n


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    ``only_a``: seeds where the event (e.g. lock-in) happened in arm A and not in arm B; ``only_b`` the reverse.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_exact_p: counts must be >= 0, got only_a={only_a}, only_b={only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(stats_a: dict[int, dict], stats_b: dict[int, dict]) -> dict:
    """Arm A against arm B over the seeds both completed.

    ``stats_a`` / ``stats_b``: seed -> a run's statistics (``final_reward``, ``worst_drawdown``, ``locked_in``).
    Returns the shared seeds, the mean per-seed differences (A - B) with their sign-flip p-values, and the
    lock-in discordant counts with McNemar's p-value.
    """
    seeds = sorted(set(stats_a) & set(stats_b))
    if not seeds:
        return {"seeds": []}
    out: dict = {"seeds": seeds}
    for key in ("final_reward", "worst_drawdown"):
        differences = [stats_a[s][key] - stats_b[s][key] for s in seeds]  # [n] A - B per seed
        out[f"{key}_diff_mean"] = sum(differences) / len(differences)
        out[f"{key}_wins_a"] = sum(d > 0 for d in differences)
        out[f"{key}_p"] = sign_flip_p(differences)
    only_a = sum(stats_a[s]["locked_in"] and not stats_b[s]["locked_in"] for s in seeds)
    only_b = sum(stats_b[s]["locked_in"] and not stats_a[s]["locked_in"] for s in seeds)
    out["locked_in_a"] = sum(stats_a[s]["locked_in"] for s in seeds)
    out["locked_in_b"] = sum(stats_b[s]["locked_in"] for s in seeds)
    out.update(locked_only_a=only_a, locked_only_b=only_b, locked_in_p=mcnemar_exact_p(only_a, only_b))
    return out
