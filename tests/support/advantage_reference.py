"""Independent float64 loop reference of the ``cppo_grpo`` advantage: one group at a time in Python floats."""

from __future__ import annotations

import math


def reference_cppo_grpo(scores, uids, norm_adv_by_std=False, std_epsilon=1e-6, exclude=True, atol=0.0):
    """(advantage, kept) per response, one group at a time in Python floats (float64)."""
    groups = {}
    for i, uid in enumerate(uids):
        groups.setdefault(uid, []).append(i)
    adv, kept = [0.0] * len(uids), [True] * len(uids)
    for rows in groups.values():
        vals = [float(scores[i]) for i in rows]
        if max(vals) - min(vals) <= atol:  # zero variance, every single-response group included
            for i in rows:
                kept[i] = not exclude
            continue
        mean = math.fsum(vals) / len(vals)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i, v in zip(rows, vals):
            adv[i] = (v - mean) / (std + std_epsilon) if norm_adv_by_std else v - mean
    return adv, kept
