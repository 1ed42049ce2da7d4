"""verl-cppo: CPPO (Cumulative Prefix-divergence Policy Optimization, arXiv 2606.10968) for verl 0.9.1.

CPPO is DPPO's divergence-masked policy gradient with a position-weighted token threshold (stricter early,
looser late) and a cumulative prefix budget (a token may not move further from the rollout policy once the
response's weighted running average divergence exceeds delta_b). Importing this package registers the policy
loss ``cppo`` with verl (see ``verl_cppo.plugin``); select it with
``actor_rollout_ref.actor.policy_loss.loss_mode=cppo`` and anchor it on the rollout policy with
``algorithm.rollout_correction.bypass_mode=True``.

Layout, pure math first and verl at the edge:
  divergence.py  binary TV / KL per token (torch only)
  mask.py        position weights, prefix budget, delta_b calibration, hard / soft gate (torch only)
  config.py      CPPOConfig and CPPOPolicyLossConfig (verl BaseConfig dataclasses, validated)
  loss.py        the registered loss: reads the config, builds the mask, verl's agg_loss, metrics
  kernels/       the same loss fused into one Triton program per response (CUDA), chosen by cppo.kernel
  anchoring.py   driver-side refusal of configurations that would not anchor on the rollout policy
  plugin.py      the ``verl.plugins`` entry point; loud on a broken install
"""

from verl_cppo.plugin import register as _register

_register()

from verl_cppo.config import CPPOConfig, CPPOPolicyLossConfig  # noqa: E402

__all__ = ["CPPOConfig", "CPPOPolicyLossConfig"]
__version__ = "0.1.0"
