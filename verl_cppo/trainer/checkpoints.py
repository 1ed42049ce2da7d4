"""Keep the latest checkpoints and the best validated one: bounded disk, best checkpoint recoverable.

The paper reports each run's best checkpoint by validation score. verl 0.9.1 bounds disk use only with
``trainer.max_actor_ckpt_to_keep`` (keep the N most recent), which deletes the best checkpoint as soon as N
newer ones exist; without it a 30B run keeps every Megatron checkpoint. This is a verl
``CheckpointCallback`` (``trainer.checkpoint_callback_class``, called by the v1 trainer on the driver after
each save) that prunes ``default_local_dir/global_step_<N>`` itself:

* kept: the ``keep_latest`` most recent checkpoints (resume; the previous one too in case the newest was
  cut short), the step named in ``latest_checkpointed_iteration.txt``, and the checkpoint whose validation
  scored best on ``best_metric`` (ties: the later step; a NaN, infinite or missing score is never best);
* deleted: every other ``global_step_<N>`` directory, including those with no validation score (a save
  between validations), so disk holds at most ``keep_latest + 1`` checkpoints.

Validation scores are read as the trainer logs them: the callback listens to the trainer's tracker
(``trainer.logger``, a ``verl.utils.tracking.Tracking``) through a ``verl_cppo.hooks`` wrapper of
``Tracking.log`` (hook ``cppo_val_history`` in patches/README.md) that hands each logged dict to the listeners
registered for that tracker, and records ``best_metric`` of every validation dict, computing the AIME average itself
(``verl_cppo.trainer.val_metrics``) when the trainer's metrics do not already carry it. The scores are persisted in
``default_local_dir/cppo_val_history.json``, so a resumed run still knows which old checkpoint was best; a
history file that cannot be read is an error naming it (pruning without it could delete the best checkpoint).
In verl's loop a step saves before it validates, so the newest checkpoint's score arrives after its save; it
is protected as one of the latest until then. Megatron ``async_save`` calls are skipped (files may still
be in flight); the next synchronous save prunes.

Options (``+trainer.cppo_checkpoints.<key>=...``): ``keep_latest`` (int >= 1, default 2), ``best_metric``
(default ``val-core/aime_avg/acc/mean@16``), ``mode`` (``max`` or ``min``, default ``max``). Set
``trainer.max_actor_ckpt_to_keep=null`` with it, or verl deletes old checkpoints (the best too) on its own.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping

from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from verl_cppo import hooks
from verl_cppo.trainer.val_metrics import average_metrics

__all__ = ["HISTORY_FILE", "KeepLatestAndBest", "best_step", "checkpoints_to_delete", "listen_to_tracker"]

logger = logging.getLogger(__name__)

HISTORY_FILE = "cppo_val_history.json"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def best_step(steps: Iterable[int], scores: Mapping[int, float], mode: str = "max") -> int | None:
    """The step of ``steps`` with the best finite score (ties: the later step); None if none has one."""
    scored = [s for s in steps if isinstance(scores.get(s), int | float) and math.isfinite(scores[s])]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda s: (sign * scores[s], s))


def checkpoints_to_delete(
    steps: Iterable[int],
    scores: Mapping[int, float],
    keep_latest: int,
    protected: Iterable[int] = (),
    mode: str = "max",
) -> list[int]:
    """The checkpoint steps to delete: all but the ``keep_latest`` newest, the best scored and ``protected``."""
    steps = sorted(set(steps))
    keep = set(steps[-keep_latest:]) | set(protected)
    best = best_step(steps, scores, mode)
    if best is not None:
        keep.add(best)
    return [s for s in steps if s not in keep]


# -- the trainer's tracker -------------------------------------------------------------------------------
_LISTENERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tracking -> [listener(data, step)]


def _notify_listeners(log: Callable) -> Callable:
    @functools.wraps(log)
    def log_and_notify(self, data, step, *args, **kwargs):
        for listener in list(_LISTENERS.get(self, ())):
            listener(data, step)
        return log(self, data, step, *args, **kwargs)

    return log_and_notify


def listen_to_tracker(tracker, listener: Callable[[Mapping, int], None]) -> None:
    """Call ``listener(data, step)`` before ``tracker`` (a ``verl.utils.tracking.Tracking``) logs each dict.

    Installs the hook ``cppo_val_history`` on ``Tracking.log`` (once per process); idempotent per listener."""
    hooks.wrap("verl.utils.tracking", "Tracking.log", _notify_listeners, name="cppo_val_history", now=True)
    listeners = _LISTENERS.setdefault(tracker, [])
    if listener not in listeners:
        listeners.append(listener)


class KeepLatestAndBest(CheckpointCallback):
    """verl checkpoint callback: keep the latest ``keep_latest`` checkpoints and the best validated one."""

    def __init__(self, config=None):
        super().__init__(config)
        trainer = config.trainer
        options = dict(trainer.get("cppo_checkpoints", None) or {})
        unknown = sorted(set(options) - {"keep_latest", "best_metric", "mode"})
        if unknown:
            raise ValueError(f"trainer.cppo_checkpoints has unknown key(s) {unknown}")
        self.keep_latest = options.get("keep_latest", 2)
        if isinstance(self.keep_latest, bool) or not isinstance(self.keep_latest, int) or self.keep_latest < 1:
            raise ValueError(f"trainer.cppo_checkpoints.keep_latest must be an int >= 1, got {self.keep_latest!r}")
        self.best_metric = str(options.get("best_metric", "val-core/aime_avg/acc/mean@16"))
        self.mode = options.get("mode", "max")
        if self.mode not in ("max", "min"):
            raise ValueError(f"trainer.cppo_checkpoints.mode must be 'max' or 'min', got {self.mode!r}")
        if trainer.get("max_actor_ckpt_to_keep", None) is not None:
            logger.warning(
                "trainer.max_actor_ckpt_to_keep=%s: verl also deletes old checkpoints, the best one included; "
                "set it to null with %s",
                trainer.max_actor_ckpt_to_keep,
                type(self).__name__,
            )
        self.root = str(trainer.default_local_dir)
        self.scores: dict[int, float] = self._load_scores()

    # -- validation scores -------------------------------------------------------------------------------
    @property
    def history_path(self) -> str:
        return os.path.join(self.root, HISTORY_FILE)

    def _load_scores(self) -> dict[int, float]:
        """The persisted scores; ValueError naming the file when it is not a JSON object of step -> number."""
        path = self.history_path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(
                f"{path}: not valid JSON ({exc}); it holds the validation score of each checkpoint "
                f"({type(self).__name__}). Restore it, or delete it to forget the scores (the best checkpoint "
                "is then chosen among those validated from now on)"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of step -> score, got {type(data).__name__}")
        scores = {}
        for step, value in data.items():
            if not (isinstance(step, str) and step.isdigit()) or isinstance(value, bool):
                raise ValueError(f"{path}: entry {step!r}: {value!r} is not <step>: <score>")
            try:
                scores[int(step)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: entry {step!r}: score {value!r} is not a number") from None
        return scores

    def score_of(self, metrics: Mapping[str, float]) -> float | None:
        """``best_metric`` of one logged dict, or None if absent or not a finite number (computing a
        ``verl_cppo.trainer.val_metrics`` average when the dict does not carry it)."""
        value = (
            metrics[self.best_metric] if self.best_metric in metrics else average_metrics(metrics).get(self.best_metric)
        )
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def record(self, metrics: Mapping[str, float], step: int) -> None:
        score = self.score_of(metrics)
        if score is None:
            if any(str(key).startswith("val-") for key in metrics):
                logger.warning(
                    "verl_cppo: step %s logged validation metrics without a finite %s; it cannot be the best",
                    step,
                    self.best_metric,
                )
            return
        self.scores[int(step)] = score
        os.makedirs(self.root, exist_ok=True)
        tmp = self.history_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({str(k): v for k, v in sorted(self.scores.items())}, f, indent=1)
        os.replace(tmp, self.history_path)

    def _on_log(self, data: Mapping, step: int) -> None:
        if any(str(key).startswith("val-") for key in data):
            self.record(data, step)

    def _hook(self, trainer) -> None:
        tracker = getattr(trainer, "logger", None)
        if tracker is not None:
            listen_to_tracker(tracker, self._on_log)

    # -- pruning -----------------------------------------------------------------------------------------
    def _steps_on_disk(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return [int(m.group(1)) for name in os.listdir(self.root) if (m := _STEP_DIR.match(name))]

    def _latest_iteration(self) -> list[int]:
        try:
            with open(os.path.join(self.root, "latest_checkpointed_iteration.txt")) as f:
                return [int(f.read().strip())]
        except (FileNotFoundError, ValueError):
            return []

    def prune(self, global_step: int) -> list[int]:
        """Delete the checkpoints ``checkpoints_to_delete`` names; returns their steps."""
        protected = [global_step, *self._latest_iteration()]
        doomed = checkpoints_to_delete(self._steps_on_disk(), self.scores, self.keep_latest, protected, self.mode)
        for step in doomed:
            path = os.path.join(self.root, f"global_step_{step}")
            logger.warning("verl_cppo: deleting %s (keeping the latest %d and the best)", path, self.keep_latest)
            shutil.rmtree(path, ignore_errors=True)
        best = best_step(self._steps_on_disk(), self.scores, self.mode)
        if best is not None:
            print(f"[verl_cppo] best checkpoint: global_step_{best} ({self.best_metric}={self.scores[best]:.4f})")
        return doomed

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs) -> None:
        self._hook(trainer)
        if async_save:
            return
        self.prune(global_step)
