"""CPU shims that let verl 0.9.1's own vLLM rollout (``rollout.name=vllm``) run on vLLM's CPU build.

verl's replica, HTTP server, worker extension and bucketed weight transfer are used as they are; on a CPU
machine three of their steps break, and each is changed here through ``verl_cppo.hooks`` (installed by
``verl_cppo.testing.register``, i.e. only under the CPU test switch, which refuses a machine with CUDA):

  weight load    vLLM CPU repacks each linear weight for oneDNN after loading and leaves an empty parameter
                 behind, so verl's ``model.load_weights`` sees shape [0]. ``update_weights_from_ipc`` is
                 wrapped in vLLM's layerwise reload (``initialize_layerwise_reload`` /
                 ``finalize_layerwise_reload``, what vLLM's own ``reload_weights`` does): the layers are
                 restored to their checkpoint shapes, loaded, and repacked again; verl's own post-load pass
                 (vLLM's ``process_weights_after_loading``, which would repack the repacked layers) is
                 skipped inside the reload, whose finalize step processes every layer exactly once.
  bucket views   on CPU ``tensor.to(device)`` copies nothing, so the received weights stay views of the
                 shared-memory bucket; the reload keeps them past ``shm.close()``, which then raises
                 ``BufferError``. ``_update_weights`` clones each received tensor first.
  no hang        after a receiver fails, verl's sender waits on its ZMQ socket forever. The sender's socket
                 gets a receive timeout (``WEIGHT_SYNC_TIMEOUT_ENV``, seconds) and a timeout becomes a
                 ``TimeoutError`` naming the weight sync and the socket. Likewise a rollout server that stops
                 answering (an engine stuck inside a step) leaves verl's agent loop awaiting its ``generate``
                 forever: ``LLMServerClient.generate`` (the one call every agent loop makes, for any rollout
                 server) gets a bound (``GENERATE_TIMEOUT_ENV``) and a ``TimeoutError`` naming the request.

The rest is configuration, set by ``verl_cppo.testing.launcher`` (``VLLM_CPU_OVERRIDES``): sleep
mode off (vLLM refuses it on CPU), eager mode (no CUDA graphs), a small KV cache. The CPU platform reaches
vLLM's worker process by itself (``import verl`` there loads ``VERL_USE_EXTERNAL_MODULES``), and the fake Ray
GPU slot of the CPU runs satisfies the server's accelerator lookup. patches/README.md lists each shim with
its equivalent diff.
"""

from __future__ import annotations

import functools
import os

from verl_cppo import hooks

__all__ = [
    "GENERATE_TIMEOUT_ENV",
    "HOOK_NAME",
    "VLLM_CPU_ENV",
    "VLLM_CPU_OVERRIDES",
    "WEIGHT_SYNC_TIMEOUT_ENV",
    "install",
]

HOOK_NAME = "vllm_cpu"
WEIGHT_SYNC_TIMEOUT_ENV = "VERL_CPPO_WEIGHT_SYNC_TIMEOUT_S"
"""Seconds verl's weight sender waits for each reply of the vLLM worker before it fails (default 120)."""
GENERATE_TIMEOUT_ENV = "VERL_CPPO_GENERATE_TIMEOUT_S"
"""Seconds one ``generate`` request of verl's agent loop may wait for the rollout server (default 600; a CPU
step of the tiny regression generates its 256 responses in a few seconds)."""
_DEFAULTS_S = {WEIGHT_SYNC_TIMEOUT_ENV: "120", GENERATE_TIMEOUT_ENV: "600"}
_SERVER_CLIENT = "verl.workers.rollout.llm_server"
_EXTENSION = "verl.workers.rollout.vllm_rollout.utils"
_TRANSFER = "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer"
_VLLM_LOADER = "vllm.model_executor.model_loader.utils"
_reloading = False
"""True while a weight sync runs inside vLLM's layerwise reload (vLLM's worker runs one sync at a time)."""

VLLM_CPU_OVERRIDES = (
    "actor_rollout_ref.rollout.name=vllm",
    # a dataclass field of verl's RolloutConfig missing from rollout.yaml, hence the "+"
    "+actor_rollout_ref.rollout.enable_sleep_mode=False",
    "actor_rollout_ref.rollout.enforce_eager=True",
    "actor_rollout_ref.rollout.free_cache_engine=False",
    # a 64 MiB KV cache (vLLM CPU's default is 4 GiB): the tiny task needs 256 sequences x 64 tokens x 1 KiB
    "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=67108864",
)
"""main_ppo overrides of a CPU run with verl's vLLM rollout."""
VLLM_CPU_ENV: dict[str, str] = {}
"""Environment of a CPU run with verl's vLLM rollout (none needed: ``VLLM_CPU_KVCACHE_SPACE``, whole GiB only,
would override ``kv_cache_memory_bytes``)."""


def _timeout_s(env: str) -> float:
    raw = os.environ.get(env, _DEFAULTS_S[env])
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{env} must be a positive number of seconds, got {raw!r}")
    return value


def _layerwise_reload(original):
    @functools.wraps(original)
    def update_weights_from_ipc(self, *args, **kwargs):
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        global _reloading
        model = self.model_runner.model
        initialize_layerwise_reload(model)
        _reloading = True
        try:
            result = original(self, *args, **kwargs)
        finally:
            _reloading = False
        finalize_layerwise_reload(model, self.model_runner.vllm_config.model_config)
        return result

    return update_weights_from_ipc


def _once_per_reload(original):
    @functools.wraps(original)
    def process_weights_after_loading(*args, **kwargs):
        if _reloading:
            return None  # finalize_layerwise_reload processes the layers after verl's load
        return original(*args, **kwargs)

    return process_weights_after_loading


def _cloned_weights(original):
    @functools.wraps(original)
    def _update_weights(self, weights, *args, **kwargs):
        return original(self, [(name, tensor.clone()) for name, tensor in weights], *args, **kwargs)

    return _update_weights


def _socket_with_timeout(original):
    @functools.wraps(original)
    def _init_socket(self):
        import zmq

        original(self)
        self.sync_timeout_s = _timeout_s(WEIGHT_SYNC_TIMEOUT_ENV)
        self.socket.setsockopt(zmq.RCVTIMEO, int(self.sync_timeout_s * 1000))
        self.socket.setsockopt(zmq.LINGER, 0)

    return _init_socket


def _send_or_fail(original):
    @functools.wraps(original)
    async def async_send_weights(self, weights):
        import zmq

        try:
            return await original(self, weights)
        except zmq.Again as error:
            raise TimeoutError(
                f"weight sync to the vLLM rollout failed: no reply from the vLLM worker on {self.zmq_handle} "
                f"within {self.sync_timeout_s:g} s ({WEIGHT_SYNC_TIMEOUT_ENV}); the worker's log says why"
            ) from error

    return async_send_weights


def _generate_or_fail(original):
    @functools.wraps(original)
    async def generate(self, request_id, *args, **kwargs):
        import asyncio

        timeout_s = _timeout_s(GENERATE_TIMEOUT_ENV)
        request = asyncio.ensure_future(original(self, request_id, *args, **kwargs))
        try:
            done, _ = await asyncio.wait({request}, timeout=timeout_s)
        finally:
            if not request.done():  # expired, or the caller was cancelled: verl's `finally` frees the slot
                request.cancel()
        if not done:
            name = self.config.actor_rollout_ref.rollout.name
            raise TimeoutError(
                f"rollout generate failed: the {name} rollout server did not answer request {request_id!r} "
                f"within {timeout_s:g} s ({GENERATE_TIMEOUT_ENV}); the server's log says why"
            )
        return request.result()

    return generate


def install() -> None:
    """Install the shims (each applied when verl imports its module; idempotent)."""
    for env in _DEFAULTS_S:
        _timeout_s(env)  # a bad value fails here, before any training step
    hooks.wrap(_EXTENSION, "vLLMColocateWorkerExtension.update_weights_from_ipc", _layerwise_reload, name=HOOK_NAME)
    hooks.wrap(_EXTENSION, "vLLMColocateWorkerExtension._update_weights", _cloned_weights, name=HOOK_NAME)
    hooks.wrap(_VLLM_LOADER, "process_weights_after_loading", _once_per_reload, name=HOOK_NAME)
    hooks.wrap(_TRANSFER, "BucketedWeightSender._init_socket", _socket_with_timeout, name=HOOK_NAME)
    hooks.wrap(_TRANSFER, "BucketedWeightSender.async_send_weights", _send_or_fail, name=HOOK_NAME)
    hooks.wrap(_SERVER_CLIENT, "LLMServerClient.generate", _generate_or_fail, name=HOOK_NAME)
