"""The averaged AIME validation metric (the paper's "AIME24/25/26 Avg@16") in verl's training logs.

verl 0.9.1 reports validation per data source: ``val-core/<data_source>/<var>/mean@<n>`` (and ``std@``,
``best@``, ``maj@`` statistics), where ``<var>`` is ``acc`` when the reward returns one (``verl_cppo.math_task.reward``
does) and ``reward`` otherwise. The paper's headline number is the mean over the AIME years of their Avg@16,
which no verl key holds. verl has no extension point for validation metrics: both trainers build the flat
dict in one method, ``_val_metrics_update`` (v1: ``verl.trainer.ppo.v1.trainer_base.PPOTrainer``; v0:
``verl.trainer.ppo.ray_trainer.RayPPOTrainer``), whose result ``_validate`` returns and ``fit`` logs.

* ``add_averages(metrics)`` is the computation: for every group in ``AVERAGES`` (default ``aime_avg`` = the
  data sources whose name starts with ``aime``, as ``examples/data/prepare_data.py`` names them), and every
  ``(section, var, mean@n)`` that each matching source reports, the unweighted mean over those sources, under
  ``<section>/<group>/<var>/mean@<n>`` (e.g. ``val-core/aime_avg/acc/mean@16``). Unweighted: each year counts
  once, as in the paper's average of the per-year columns (AIME years have 30 problems each, so it equals the
  per-problem mean there). Only ``mean@n`` is averaged; a standard deviation or a bootstrap statistic of a
  mean over sources is not the mean of theirs.
* ``install()`` wraps ``_val_metrics_update`` of both trainer classes with ``with_average`` (through
  ``verl_cppo.hooks``, when verl imports each trainer module) so that its result gains those keys
  (idempotent; ``uninstall()`` restores verl's methods). The plugin calls it in every process, so the
  trainer's process (verl's ``TaskRunner`` Ray actor) has it whichever trainer it imports.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Mapping

from verl_cppo import hooks

__all__ = ["AVERAGES", "add_averages", "average_metrics", "install", "uninstall", "with_average"]

AVERAGES: dict[str, str] = {"aime_avg": r"^aime(?!_avg$)"}
"""Averaged groups: name -> regular expression on the data source (``re.search``)."""

_MEAN = re.compile(r"^mean@\d+$")
_BOOTSTRAP = re.compile(r"^(best|worst|maj)@\d+$")


def _parse(key: str) -> tuple[str, str, str, str] | None:
    """``<section>/<data_source>/<var>/<metric>`` -> its parts; metric is ``mean@n``, ``std@n`` or a two-part
    bootstrap statistic such as ``best@n/mean``; None for any other key."""
    parts = key.split("/")
    if parts[0] not in ("val-core", "val-aux"):
        return None
    width = 2 if len(parts) >= 5 and _BOOTSTRAP.match(parts[-2]) else 1
    if len(parts) < 3 + width:
        return None
    return parts[0], "/".join(parts[1 : -1 - width]), parts[-1 - width], "/".join(parts[-width:])


def average_metrics(metrics: Mapping[str, float], averages: Mapping[str, str] | None = None) -> dict[str, float]:
    """The averaged keys for verl's flat validation dict ``metrics`` (nothing else).

    A key ``<section>/<data_source>/<var>/mean@<n>`` (``section`` = ``val-core`` or ``val-aux``; a data source
    may contain ``/``) counts for group G when the data source matches G's pattern. A ``(section, var,
    mean@n)`` is averaged only when every data source of G that reports anything reports it, so that a year
    missing from one validation never silently shifts the average."""
    averages = AVERAGES if averages is None else averages
    out: dict[str, float] = {}
    for group, pattern in averages.items():
        regex = re.compile(pattern)
        values: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
        sources: set[str] = set()
        for key, value in metrics.items():
            parsed = _parse(key)
            if parsed is None:
                continue
            section, source, var, name = parsed
            if source == group or not regex.search(source):
                continue
            sources.add(source)
            if _MEAN.match(name):
                values[(section, var, name)][source] = float(value)
        for (section, var, name), per_source in sorted(values.items()):
            if set(per_source) == sources:
                out[f"{section}/{group}/{var}/{name}"] = sum(per_source.values()) / len(per_source)
    return out


def add_averages(metrics: dict, averages: Mapping[str, str] | None = None) -> dict:
    """``metrics`` with the averaged keys added (in place; also returned)."""
    metrics.update(average_metrics(metrics, averages))
    return metrics


def with_average(original):
    """A ``_val_metrics_update`` that returns ``original``'s metrics with the averaged keys added (the
    ``make_wrapper`` of a runtime hook on ``PPOTrainer._val_metrics_update`` / ``RayPPOTrainer._...``)."""

    @functools.wraps(original)
    def _val_metrics_update(self, *args, **kwargs):
        return add_averages(original(self, *args, **kwargs))

    return _val_metrics_update


_HOOKS = (
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._val_metrics_update"),
    ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._val_metrics_update"),
)
HOOK_NAME = "val_aime_average"


def install(now: bool = False) -> None:
    """Add the averaged keys to the validation metrics of verl's v1 and v0 trainers, through
    ``verl_cppo.hooks`` when verl imports each trainer module (``now``: import them first). Idempotent."""
    for module, attribute in _HOOKS:
        hooks.wrap(module, attribute, with_average, name=HOOK_NAME, now=now)


def uninstall() -> None:
    """Restore verl's ``_val_metrics_update`` methods."""
    for module, attribute in _HOOKS:
        hooks.unwrap(module, attribute)
