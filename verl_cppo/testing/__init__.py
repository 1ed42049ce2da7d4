"""Test infrastructure: verl 0.9.1's real trainer on a CPU-only machine (CI has no GPU).

Nothing here is active unless asked for. ``import verl_cppo`` (the plugin) never imports this package;
importing ``verl_cppo.testing`` itself registers nothing. The switch is explicit and has two parts:

* ``VERL_CPPO_CPU_TESTING=1`` says "this process is a CPU test run";
* ``VERL_USE_EXTERNAL_MODULES=verl_cppo.testing.register`` makes ``import verl`` import the registering
  module in every process (driver, TaskRunner, actor workers, rollout servers, reward and agent-loop workers;
  propagate both through ``ray_kwargs.ray_init.runtime_env.env_vars``).

``verl_cppo.testing.register`` refuses to register anything without the first variable, and refuses on a
machine where CUDA is available, so a copied runtime_env cannot switch a GPU job to CPU.

What it registers, each through verl's own registry (no verl file is edited), or installs through
``verl_cppo.hooks``:
  cpu_platform.py  ``PlatformRegistry`` "cpu": torch.cpu device module with no-op memory calls, gloo;
                   ``EngineRegistry``: the FSDP2 language-model engine for device "cpu"
  vllm_cpu.py      the shims that let verl's own vLLM rollout run on vLLM's CPU build, and its settings
  cpu_ulysses.py   Ulysses SP on gloo: a packed causal attention behind verl's flash seam, all_to_all_single
  cpu_megatron.py  ``EngineRegistry``: verl's Megatron engines for device "cpu", and the CPU shims of megatron-core /
                   mbridge / verl they need (local layer spec, CPU RNG tracker, fp32, a scoped CUDA-to-CPU mode)
  cp_attention.py  the context-parallel core attention of that spec (zig-zag, THD or SBHD, GQA; plain PyTorch)
  loss_probe.py    with VERL_CPPO_LOSS_PROBE=1, what ppo_loss receives, as metrics (tests only)
Used by name, not registered:
  tiny_task.py     a tiny Qwen3 and word-level tokenizer built from a config, the synthetic copy task as verl
                   parquet, and its verl custom reward function
  launcher.py      ``main_ppo`` on CPU: the environment block, the tiny task's command line, the loss arms, the
                   subprocess, verl's per-step metrics and progress lines (``run_arm``: ci/tiny_regression.py,
                   ci/multirank_runs.py, the stability study)
  replay_buffer.py verl's sync replay buffer with a shorter poll interval (``custom_sampler`` hook)

Runtime hooks (patches/README.md: ``cpu_process_group_backend``, ``vllm_cpu``, ``loss_probe``,
``cpu_varlen_attention``, ``cpu_megatron``), e.g.: verl builds the process-group backend string
``cpu:gloo,<device>:<backend>``, which torch rejects when the device is the CPU.
"""

SWITCH_ENV = "VERL_CPPO_CPU_TESTING"
"""Set to 1 to let ``verl_cppo.testing.register`` switch verl to the CPU platform."""

REGISTER_MODULE = "verl_cppo.testing.register"
"""The module to name in VERL_USE_EXTERNAL_MODULES."""

PLATFORM_NAME = "cpu"
"""``VERL_PLATFORM`` value of the CPU platform."""

__all__ = ["PLATFORM_NAME", "REGISTER_MODULE", "SWITCH_ENV"]
