"""verl-cppo: CPPO (Cumulative Prefix-divergence Policy Optimization, arXiv 2606.10968) for verl 0.9.1.

CPPO is DPPO's divergence-masked policy gradient with a position-weighted token threshold (stricter early,
looser late) and a cumulative prefix budget (a token may not move further from the rollout policy once the
response's weighted running average divergence exceeds delta_b). Importing this package registers the policy
loss ``cppo`` with verl (see ``verl_cppo.plugin``); select it with
``actor_rollout_ref.actor.policy_loss.loss_mode=cppo`` and anchor it on the rollout policy with
``algorithm.rollout_correction.bypass_mode=True``. It also registers the paper's outcome advantage
``cppo_grpo`` (``algorithm.adv_estimator=cppo_grpo``).

Layers, pure math first and verl at the edge (each imports only the layers above it in this list; without
verl installed, importing the package registers nothing and ``core`` and ``kernels`` still work):
  core/        the rule itself, pure torch: divergences, mask, per-token loss terms, Top-K divergence
  kernels/     Triton twins of core (fused loss, Top-K statistics) and the choice between kernel and torch
  config.py    CPPOConfig / CPPOPolicyLossConfig / CPPOGRPOConfig / CPPOAlgoConfig (verl BaseConfig, validated)
  hooks/       the one mechanism that changes verl at runtime (wrappers on import, import-time diffs)
  topk/        Top-K plumbing: rollout top-K fields, the engine hook, the channel to the loss, launch setup
  loss.py      the registered ``cppo`` loss: config -> dispatch -> verl's agg_loss -> metrics
  sharding/    shard-local loss: drawn layouts, distributed prefix scan and quantile, Megatron CP hook
  advantage/   the registered ``cppo_grpo`` estimator and the hooks carrying its excluded groups
  driver.py    every driver-side check of a composed config, before Ray starts (main_ppo and the dry run);
  launch_checks.py  its checks that are not about CPPO (worker configs, names verl resolves late, GPU layout)
  plugin.py    the ``verl.plugins`` entry point; loud on a broken install
  testing/     CPU platform, CPU rollout and tiny task for CI (imported only by tests and ci/)
"""

import importlib.util

__all__ = ["CPPOAlgoConfig", "CPPOConfig", "CPPOGRPOConfig", "CPPOPolicyLossConfig"]
__version__ = "0.1.0"

if importlib.util.find_spec("verl") is not None:
    from verl_cppo.plugin import register as _register

    _register()

    from verl_cppo.config import CPPOAlgoConfig, CPPOConfig, CPPOGRPOConfig, CPPOPolicyLossConfig
else:  # verl_cppo.core and verl_cppo.kernels stay usable without verl

    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(f"verl_cppo.{name} needs verl (pip install verl==0.9.1)")
        raise AttributeError(f"module 'verl_cppo' has no attribute {name!r}")
