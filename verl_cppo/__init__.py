"""verl-cppo: CPPO (Cumulative Prefix-divergence Policy Optimization, arXiv 2606.10968) for verl 0.9.1.

CPPO is DPPO's divergence-masked policy gradient with a position-weighted token threshold (stricter early,
looser late) and a cumulative prefix budget (a token may not move further from the rollout policy once the
response's weighted running average divergence exceeds delta_b). Importing this package registers the policy
loss ``cppo`` with verl (see ``verl_cppo.plugin``); select it with
``actor_rollout_ref.actor.policy_loss.loss_mode=cppo`` and anchor it on the rollout policy with
``algorithm.rollout_correction.bypass_mode=True``. It also registers the paper's outcome advantage
``cppo_grpo`` (``algorithm.adv_estimator=cppo_grpo``).

Layout, pure math first and verl at the edge:
  divergence.py  binary TV / KL per token (torch only)
  mask.py        position weights, prefix budget, delta_b calibration, hard / soft gate (torch only)
  config.py      CPPOConfig and CPPOPolicyLossConfig (verl BaseConfig dataclasses, validated)
  loss.py        the registered loss: reads the config, builds the mask, verl's agg_loss, metrics
  kernels/       the same loss fused into one Triton program per response (CUDA), chosen by cppo.kernel
  anchoring.py   driver-side refusal of configurations that would not anchor on the rollout policy
  plugin.py      the ``verl.plugins`` entry point; loud on a broken install
  advantage.py   the registered advantage estimator ``cppo_grpo`` (group arithmetic in torch)
  algo_config.py CPPOGRPOConfig and CPPOAlgoConfig (the estimator's settings, validated)
  exclusion.py   hooks that carry cppo_grpo's excluded groups to the loss normalisers
  post_import.py run a hook right after verl imports a module
"""

from verl_cppo.plugin import register as _register

_register()

from verl_cppo.algo_config import CPPOAlgoConfig, CPPOGRPOConfig  # noqa: E402
from verl_cppo.config import CPPOConfig, CPPOPolicyLossConfig  # noqa: E402

__all__ = ["CPPOAlgoConfig", "CPPOConfig", "CPPOGRPOConfig", "CPPOPolicyLossConfig"]
__version__ = "0.1.0"
