"""verl's sync replay buffer with a configurable poll interval, for short CPU test runs.

verl 0.9.1's v1 sync trainer waits for a step's trajectories by polling TransferQueue every 2 s
(``ReplayBuffer.poll_interval``, a constructor argument its config does not expose). A tiny CPU run generates
a step in well under 2 s, so every step would idle until the next poll. This subclass, plugged in through
verl's own extension point, only changes that interval (sampling semantics are the built-in ones):

    trainer.v1.sampler.custom_sampler.path=pkg://verl_cppo.testing.replay_buffer
    trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer
    +trainer.v1.sampler.sampler_kwargs.poll_interval=0.1
"""

from __future__ import annotations

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

__all__ = ["PollingReplayBuffer"]


class PollingReplayBuffer(ReplayBuffer):
    def __init__(self, *args, sampler_kwargs=None, **kwargs):
        interval = float((sampler_kwargs or {}).get("poll_interval", 2.0))
        if not interval > 0:
            raise ValueError(f"trainer.v1.sampler.sampler_kwargs.poll_interval must be > 0, got {interval}")
        super().__init__(*args, sampler_kwargs=sampler_kwargs, poll_interval=interval, **kwargs)
