"""Importing this module turns on the shard-local CPPO loss in verl's Megatron engine (context parallel > 1).

    actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_local

verl imports ``model.external_lib`` in every actor worker before it builds the engine; the hook
(``verl_cppo.sharding.megatron``) then skips the CP all-gather of log-probs for training micro-batches whose loss
is ``cppo`` and computes the loss on each rank's shard. Off unless this module is imported.
"""

from verl_cppo.sharding.megatron import install

install()
