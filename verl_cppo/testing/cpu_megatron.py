"""verl 0.9.1's Megatron engine on the CPU test platform (megatron-core 0.16.1, mbridge 0.15.1, gloo).

verl's ``MegatronEngine`` builds a megatron-core ``GPTModel`` through mbridge and trains it with megatron's
distributed optimizer and no-pipelining schedule. Each piece assumes CUDA and Transformer Engine (TE) somewhere;
this module replaces exactly those places, each named by the upstream file:line it stands in for, through
``verl_cppo.hooks`` (patches/README.md, `cpu_megatron`):

* ``engine``: ``EngineRegistry`` has Megatron engines for cuda / npu only (``verl/workers/engine/base.py:426``
  raises "No engine registered for device='cpu'"); the LM and value-head engines are registered for "cpu".
* ``rng``: megatron's CUDA RNG tracker reads ``torch.cuda.get_rng_state`` (``megatron/core/tensor_parallel/
  random.py:235``, in ``CudaRNGStatesTracker.add``) and forks through ``_get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` (``:41``, ``:72``, used at ``:250``, ``:255``): the tracker's states become CPU
  generator states. Dropout is 0 in the tests, so no random draw depends on it.
* ``layer_spec``: ``mbridge/core/llm_bridge.py:149`` hard-codes ``get_gpt_decoder_block_spec(config,
  use_transformer_engine=True)``, which needs TE (``models/gpt/gpt_layer_specs.py:527``, NameError ``TENorm``):
  the local (plain PyTorch) spec is used, with ``verl_cppo.testing.cp_attention.ContextParallelCoreAttention``
  as the core attention (megatron's local ``DotProductAttention`` refuses CP and THD,
  ``transformer/dot_product_attention.py:57``, ``:153``).
* ``norm_names``: the local spec names the norms ``input_layernorm`` / ``pre_mlp_layernorm``; mbridge's weight
  maps know only TE's fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
  (``mbridge/core/bridge.py:646`` NotImplementedError "Unsupported parameter name"): the local names are
  looked up under the TE names (load and export use the same map, so both directions are covered).
* ``fp32``: ``McoreEngineConfig.__post_init__`` accepts only bf16 / fp16 (``verl/workers/config/engine.py:218``);
  ``dtype="float32"`` passes the check (equivalence to float32 rounding needs it: bf16 differs by 1e-2).
* ``cuda_calls``: megatron and mbridge allocate on ``device="cuda"``, call ``Tensor.cuda()`` and check
  ``param.type() == "torch.cuda.FloatTensor"`` in code that also does real work; ``cpu_device_scope`` (a
  ``TorchFunctionMode``: "cuda" devices become "cpu", ``.cuda()`` stays put, ``Tensor.type()`` reports the
  ``torch.cuda.*`` name; and ``torch.cuda.current_device`` returns "cpu") is entered only around the five calls
  that contain those lines, named in ``CUDA_SCOPES``, and suspended in verl's code that megatron's schedule calls
  back (``CUDA_SUSPENDED``: batch preparation, THD split and gather, the loss and the shard-local hook; the model
  call inside re-enters it). It is not global: outside (verl's data path, the loss, the tests' own code) nothing
  is rewritten, so a device mistake there still fails.

What this does not cover (unproven on CPU): TE's attention kernels and its CP exchange (replaced by the
all-gather attention above), Megatron-Bridge (verl's default; it requires TE: ``vanilla_mbridge=True`` is used),
bf16 numerics, sequence parallelism's norm (``sequence_parallel=False``), pipeline parallelism, NCCL.

Installed by ``verl_cppo.testing.register`` only (CPU test switch on).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from verl_cppo import hooks

__all__ = [
    "CUDA_SCOPES",
    "CUDA_SUSPENDED",
    "HOOK_NAME",
    "HOOK_TARGETS",
    "OVERRIDE_TRANSFORMER_CONFIG",
    "PROVEN_ENGINE",
    "PROVEN_EXTERNAL_LIB",
    "cpu_device_scope",
    "install",
    "installed",
]

HOOK_NAME = "cpu_megatron"

OVERRIDE_TRANSFORMER_CONFIG = {
    "transformer_impl": "local",
    "sequence_parallel": False,  # mbridge sets it when tp > 1; torch's norm refuses it (torch_norm.py:32)
    "masked_softmax_fusion": False,  # mbridge sets it; the fused kernels are CUDA-only
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "apply_rope_fusion": False,
    "cross_entropy_loss_fusion": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}
"""``McoreEngineConfig.override_transformer_config`` of the CPU runs: no CUDA fusions, no dropout, no SP."""

PROVEN_ENGINE = {
    "strategy": "megatron",
    "use_mbridge": True,
    "vanilla_mbridge": True,  # mbridge; verl's default Megatron-Bridge needs TE
    "use_remove_padding": True,  # THD packing: the layout the shard-local loss serves
    "use_distributed_optimizer": True,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "dynamic_context_parallel": False,
    "use_fused_kernels": False,
    "use_megatron_fsdp": False,
}
"""``McoreEngineConfig`` values the CPU equivalence trains with and the Megatron example launches with
(tests/examples/test_megatron_example.py); sizes (TP, CP) and the CPU-only settings are set beside them."""

PROVEN_EXTERNAL_LIB = "verl_cppo.megatron_shard_local"
"""``actor_rollout_ref.model.external_lib`` of both: the shard-local CPPO loss under CP (it imports the plugin)."""

_TE_NORM_NAMES = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an index means a CUDA device


class _CudaToCpu(TorchFunctionMode):
    """device "cuda" -> "cpu", ``pin_memory`` off, ``.cuda()`` a no-op, ``.type()`` the ``torch.cuda`` name; a
    pass-through while the scope is suspended (``_IN_SCOPE`` False)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not _IN_SCOPE.get():
            return func(*args, **kwargs)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


_IN_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar("verl_cppo_cpu_device_scope", default=False)


def _current_device_in_scope(original):
    @functools.wraps(original)
    def current_device():
        # a device, not an index, inside the scope: torch.empty(device=current_device()) stays on the CPU
        return "cpu" if _IN_SCOPE.get() else original()

    return current_device


@contextlib.contextmanager
def cpu_device_scope(active: bool = True):
    """Inside: megatron's CUDA allocations, moves and type checks run on CPU tensors (see the module doc).
    ``active=False`` suspends an enclosing scope (verl's own code called from inside megatron's schedule).
    ``torch.cuda.current_device`` is wrapped once (``hooks.wrap``) and answers "cpu" only inside a scope."""
    hooks.wrap("torch.cuda", "current_device", _current_device_in_scope, name=HOOK_NAME, now=True)
    token = _IN_SCOPE.set(active)
    try:
        if active:
            with _CudaToCpu():
                yield
        else:
            yield
    finally:
        _IN_SCOPE.reset(token)


CUDA_SCOPES = (
    # mbridge/core/util.py:151 model_module.cuda(current_device()); tensor_parallel/layers.py:261, :873, :1197
    # and distributed/param_and_grad_buffer.py:800, :806 (current_device); DDP buffers
    ("verl.workers.engine.megatron.transformer_impl", "MegatronEngine._build_megatron_module"),
    # optimizer/optimizer.py:481, :485 torch.tensor(device="cuda"); distrib_optimizer.py:361, :420, :582 type()
    ("verl.workers.engine.megatron.transformer_impl", "MegatronEngine._build_optimizer"),
    # pipeline_parallel/schedules.py:596 torch.zeros(device="cuda") (verl's steps inside it: CUDA_SUSPENDED)
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"),
    # the model's forward: rotary_pos_embedding.py:78, :162 and tensor_parallel/mappings.py:91 (current_device),
    # rope_utils.py:62 (.cuda(), SBHD with CP only)
    ("megatron.core.models.gpt.gpt_model", "GPTModel.forward"),
    # optimizer/clip_grads.py:103, :174 zeros on cuda, :167 type(); utils.py:1207 l2 norm on cuda
    ("verl.workers.engine.megatron.transformer_impl", "MegatronEngine.optimizer_step"),
)


CUDA_SUSPENDED = (
    # verl's code that megatron's schedule calls: batch preparation, THD split and gather, the logits hook
    # (forward_step, around the model call, which re-enters the scope) and the loss (postprocess_micro_batch_func)
    ("verl.workers.engine.megatron.transformer_impl", "MegatronEngineWithLMHead.forward_step"),
    ("verl.workers.engine.megatron.transformer_impl", "MegatronEngineWithLMHead.postprocess_micro_batch_func"),
)


def _outside_cpu_device_scope(original):
    @functools.wraps(original)
    def as_verl_runs_it(*args, **kwargs):
        with cpu_device_scope(active=False):
            return original(*args, **kwargs)

    return as_verl_runs_it


def _in_cpu_device_scope(original):
    @functools.wraps(original)
    def on_cpu(*args, **kwargs):
        with cpu_device_scope():
            return original(*args, **kwargs)

    return on_cpu


def _cpu_rng_add(original):
    @functools.wraps(original)
    def add(self, name, seed):  # random.py:217-240 on the CPU generator
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")  # megatron's own error
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would reach torch.cuda.manual_seed_all
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    return add


def _cpu_get_rng_state(original):
    @functools.wraps(original)
    def get_rng_state(device=-1, clone=False, graph_safe=False):
        return torch.get_rng_state()

    return get_rng_state


def _cpu_set_rng_state(original):
    @functools.wraps(original)
    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    return set_rng_state


def _local_layer_spec(original):
    @functools.wraps(original)
    def get_transformer_layer_spec(self, vp_stage=None):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        from verl_cppo.testing.cp_attention import ContextParallelCoreAttention

        if self.config.normalization != "RMSNorm":  # mbridge's own check (llm_bridge.py:140)
            raise ValueError(f"mbridge serves RMSNorm only, got normalization={self.config.normalization!r}")
        spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=False, vp_stage=vp_stage)
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = ContextParallelCoreAttention
        return spec

    return get_transformer_layer_spec


def _te_norm_names(original):
    @functools.wraps(original)
    def weight_name_mapping_mcore_to_hf(self, mcore_weights_name: str):
        for local, te in _TE_NORM_NAMES.items():
            if mcore_weights_name.endswith(local):
                mcore_weights_name = mcore_weights_name[: -len(local)] + te
        return original(self, mcore_weights_name)

    return weight_name_mapping_mcore_to_hf


def _fp32_engine_config(original):
    @functools.wraps(original)
    def __post_init__(self):
        if self.dtype not in ("float32", "fp32"):
            return original(self)
        object.__setattr__(self, "dtype", "bfloat16")  # past engine.py:218's bf16 / fp16 assertion
        try:
            original(self)
        finally:
            object.__setattr__(self, "dtype", "float32")

    return __post_init__


def _register_engines() -> None:
    """verl's Megatron LM and value-head engines for device "cpu" (idempotent)."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead, MegatronEngineWithValueHead

    engines = (("language_model", MegatronEngineWithLMHead), ("value_model", MegatronEngineWithValueHead))
    for model_type, engine in engines:
        if "cpu" not in EngineRegistry._engines.get(model_type, {}).get("megatron", {}):
            EngineRegistry.register(model_type=model_type, backend="megatron", device="cpu")(engine)


_RANDOM = "megatron.core.tensor_parallel.random"
_HOOKS = (
    (_RANDOM, "CudaRNGStatesTracker.add", _cpu_rng_add),
    (_RANDOM, "_get_cuda_rng_state", _cpu_get_rng_state),
    (_RANDOM, "_set_cuda_rng_state", _cpu_set_rng_state),
    ("mbridge.core.llm_bridge", "LLMBridge._get_transformer_layer_spec", _local_layer_spec),
    ("mbridge.core.bridge", "Bridge._weight_name_mapping_mcore_to_hf", _te_norm_names),
    ("verl.workers.config.engine", "McoreEngineConfig.__post_init__", _fp32_engine_config),
    *((module, attribute, _in_cpu_device_scope) for module, attribute in CUDA_SCOPES),
    *((module, attribute, _outside_cpu_device_scope) for module, attribute in CUDA_SUSPENDED),
)
HOOK_TARGETS = tuple(f"{module}:{attribute}" for module, attribute, _ in _HOOKS)
"""``module:attribute`` of every shim ``install`` puts in place (patches/README.md, `cpu_megatron`)."""


def install() -> None:
    """Register the engines and install every shim of the module doc (idempotent). The shims apply when their
    module is imported (mbridge takes seconds to import; a process that never builds a Megatron engine, e.g. an
    FSDP test or a vLLM server, never imports it)."""
    _register_engines()
    for module, attribute, make_wrapper in _HOOKS:
        hooks.wrap(module, attribute, make_wrapper, name=HOOK_NAME)


def installed() -> list[str]:
    """``module:attribute`` of every shim in place, under any wrappers stacked on it (tests, reports)."""
    import importlib

    done = []
    for module, attribute, _ in _HOOKS:
        owner = importlib.import_module(module)
        for part in attribute.split("."):
            owner = getattr(owner, part)
        while hooks.hook_name(owner) not in (None, HOOK_NAME):
            owner = owner.__verl_cppo_original__
        if hooks.hook_name(owner) == HOOK_NAME:
            done.append(f"{module}:{attribute}")
    return done
