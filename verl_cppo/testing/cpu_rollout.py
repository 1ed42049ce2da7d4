"""Rollout backend ``hf_cpu``: verl 0.9.1's async rollout contract served by HF transformers on CPU.

verl's v1 trainer talks to a rollout backend through three registered pieces; this module provides each,
the same shape as verl's vLLM backend (``vllm_rollout/vllm_async_server.py``, ``vllm_rollout.py``) and
the external verl-project/vexact backend:

  HFCPUServer         the generation server, one Ray actor per replica. ``generate(prompt_ids,
                      sampling_params, request_id)`` -> ``TokenOutput`` with the sampled tokens and their
                      log-probs under the rollout policy (``rollout_log_probs``, what bypass mode anchors on).
                      No top-K: the Top-K divergences are served, and tested, by verl's live vLLM server.
                      Also the control surface verl calls: sleep / wake_up, abort / resume, kv-cache calls.
  HFCPUServerAdapter  the ``BaseRollout`` living in each actor worker (hybrid engine): after every step
                      verl hands it the trained weights (``update_weights``), which it forwards to the server.
  HFCPUReplica        the ``RolloutReplica`` that starts the server next to its workers.

Hybrid mode only (actor and rollout share the worker group), which is what verl's sync v1 trainer uses.
The server keeps its weights while "asleep" (nothing to free on a CPU) but refuses to generate then: a
generate call between verl's sleep and its weight sync would sample from stale weights, and the test run
should fail loudly if verl's call order ever changes. Sampling details: ``verl_cppo.testing.sampling``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator, get_max_position_embeddings

from verl_cppo.testing import ROLLOUT_NAME
from verl_cppo.testing.sampling import SampledTokens, sample_batch

__all__ = ["HFCPUReplica", "HFCPUServer", "HFCPUServerAdapter", "register"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    generator: torch.Generator
    future: asyncio.Future


def _server_name(replica_rank: int, node_rank: int) -> str:
    return f"{ROLLOUT_NAME}_server_{replica_rank}_{node_rank}"


class HFCPUServer:
    """One rollout replica: an HF causal LM on CPU behind verl's token-in token-out server API."""

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        rollout_mode: RolloutMode,
        replica_rank: int,
        node_rank: int,
    ):
        from transformers import AutoModelForCausalLM

        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.node_rank = node_rank
        if self.config.dtype not in _DTYPES:
            raise ValueError(f"actor_rollout_ref.rollout.dtype={self.config.dtype!r}: use one of {sorted(_DTYPES)}")
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_config.local_path, dtype=_DTYPES[self.config.dtype], attn_implementation="sdpa"
        ).eval()
        self.max_model_len = self.config.max_model_len or get_max_position_embeddings(self.model_config.hf_config)
        self.stop_token_ids = self._stop_token_ids()
        self.asleep = False  # between verl's sleep() and the wake_up() that follows its weight sync
        self.weights_version: int | None = None  # global_steps of the last weight sync
        self.request_counts: dict[str, int] = {}  # per request id, for per-request seeds
        self._pending: dict[tuple, list[_Request]] = {}  # (prompt length, sampling params) -> queued requests
        self._batcher: asyncio.Task | None = None
        self.address = ray.util.get_node_ip_address().strip("[]")

    def _stop_token_ids(self) -> set[int]:
        if self.config.ignore_eos:
            return set()
        eos = getattr(self.model_config.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.model_config.tokenizer.eos_token_id
        ids = {eos} if isinstance(eos, int) else set(eos or [])
        if not ids:
            raise ValueError(f"{self.model_config.local_path}: no eos_token_id in generation_config or tokenizer")
        return ids

    async def launch_server(self, *args, **kwargs) -> None:
        return None

    def get_server_address(self) -> tuple[str, int]:
        # no HTTP server: the replica rank stands in for a port so verl's load balancer keys stay unique
        return self.address, self.replica_rank

    def _generator(self, request_id: str) -> torch.Generator:
        """Seed from (rollout.seed, replica, request id, times seen). Where request ids name samples (verl's
        det-<priority> under rollout.full_determinism), a rerun draws the same samples in any arrival order.
        verl 0.9.1's TransferQueue agent loop attaches no priority, so every request is det-0 and the fixed
        seed sequence is dealt out in arrival order (ci/README.md: why reruns differ)."""
        count = self.request_counts.get(request_id, 0)
        self.request_counts[request_id] = count + 1
        key = f"{self.config.seed}:{self.replica_rank}:{request_id}:{count}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        if image_data is not None or video_data is not None:
            raise ValueError(f"rollout {ROLLOUT_NAME} is text-only; got image or video data")
        if self.asleep:
            raise RuntimeError(
                f"{_server_name(self.replica_rank, self.node_rank)}: generate() called while asleep "
                "(after verl's sleep(), before the wake_up() that follows its weight sync)"
            )
        params = dict(sampling_params)
        max_possible = self.max_model_len - len(prompt_ids)
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if max_tokens is None:
            max_tokens = min(
                self.config.response_length, self.config.prompt_length + self.config.response_length - len(prompt_ids)
            )
        max_tokens = min(max_tokens, max_possible)
        if max_tokens < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room within {self.max_model_len}")
        do_sample = params.pop("do_sample", self.config.do_sample)
        temperature = float(params.pop("temperature", self.config.temperature)) if do_sample else 0.0
        top_k = int(params.pop("top_k", self.config.top_k))
        top_p = float(params.pop("top_p", self.config.top_p))
        request = _Request(
            list(prompt_ids), max_tokens, self._generator(request_id), asyncio.get_running_loop().create_future()
        )
        self._pending.setdefault((len(prompt_ids), temperature, top_k, top_p), []).append(request)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._decode_pending())
        sampled: SampledTokens = await request.future
        want_log_probs = params.pop("logprobs", False)
        extra_fields = {"global_steps": self.weights_version}
        return TokenOutput(
            token_ids=sampled.token_ids,
            log_probs=sampled.log_probs if want_log_probs else None,
            stop_reason="completed",
            extra_fields=extra_fields,
        )

    async def _decode_pending(self) -> None:
        """Decode queued requests in batches of equal prompt length and sampling parameters.

        verl's agent loop sends a step's requests concurrently; yielding once lets them queue up, so one
        batch serves many requests. Batch composition does not change a request's result (see sampling.py).
        """
        await asyncio.sleep(0)
        while self._pending:
            (_, temperature, top_k, top_p), requests = self._pending.popitem()
            for start in range(0, len(requests), self.config.max_num_seqs):
                chunk = requests[start : start + self.config.max_num_seqs]
                try:
                    results = sample_batch(
                        self.model,
                        [r.prompt_ids for r in chunk],
                        [r.max_tokens for r in chunk],
                        self.stop_token_ids,
                        [r.generator for r in chunk],
                        temperature=temperature,
                        top_k=top_k,
                        top_p=top_p,
                    )
                except Exception as exc:  # fail the requests, not the batcher
                    for r in chunk:
                        r.future.set_exception(exc)
                    continue
                for r, result in zip(chunk, results):
                    r.future.set_result(result)
            await asyncio.sleep(0)

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], global_steps: int | None) -> int:
        """Load the actor's full (unsharded) weights; every parameter must be covered. Returns the count."""
        state = dict(named_tensors)
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        missing = sorted(name for name in own if name not in state and not self._is_tied(name, state))
        if unknown or missing:
            raise ValueError(f"weight sync mismatch: unknown {unknown[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, model {own[name].shape}")
                own[name].copy_(tensor)
        self.weights_version = global_steps
        return len(state)

    def _is_tied(self, name: str, state: dict[str, torch.Tensor]) -> bool:
        return (
            name == "lm_head.weight" and self.model.config.tie_word_embeddings and "model.embed_tokens.weight" in state
        )

    async def get_weights_digest(self) -> dict[str, float]:
        """Sum of each parameter (tests compare it with the actor's weights)."""
        return {name: float(p.double().sum()) for name, p in self.model.state_dict().items()}

    async def wake_up(self, tags: list[str] | None = None) -> None:
        self.asleep = False

    async def sleep(self) -> None:
        if self.config.free_cache_engine and self.rollout_mode == RolloutMode.HYBRID:
            self.asleep = True

    async def set_global_steps(self, global_steps: int) -> None:
        self.weights_version = global_steps

    async def clear_kv_cache(self) -> None:  # no cache outlives a request
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:  # requests run to completion one at a time
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id, "error": f"{ROLLOUT_NAME} does not abort requests"}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class HFCPUServerAdapter(BaseRollout):
    """The ``BaseRollout`` of each actor worker: forwards wake-up / sleep and the actor's weights."""

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh: Any, replica_rank: int = -1):
        import os

        super().__init__(config, model_config, device_mesh)
        world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        rank = int(os.environ["RANK"])
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.node_rank = self.rollout_rank // int(os.environ.get("RAY_LOCAL_WORLD_SIZE", world))
        self.is_leader_rank = self.rollout_rank == 0
        self._server = None

    @property
    def server(self):
        if self._server is None:  # the replica starts the server after the worker group
            self._server = ray.get_actor(_server_name(self.replica_rank, self.node_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        if self.config.free_cache_engine and self.is_leader_rank:
            await self.server.wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.config.free_cache_engine and self.is_leader_rank:
            await self.server.sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps=None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"rollout {ROLLOUT_NAME} takes wire_format='named_tensors', got {wire_format}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(f"rollout {ROLLOUT_NAME} does not take LoRA adapters")
        # every rank drains the generator: the FSDP engine all-gathers each tensor collectively
        named = [(name, tensor.detach().to("cpu", copy=True)) async for name, tensor in ensure_async_iterator(weights)]
        if self.is_leader_rank:
            await self.server.update_weights.remote(named, global_steps)


class HFCPUReplica(RolloutReplica):
    """Starts one ``HFCPUServer`` per replica node, pinned to the node of its first worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(HFCPUServer)

    async def launch_servers(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(f"rollout {ROLLOUT_NAME} runs in hybrid mode only, not {self.rollout_mode}")
        node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
        if self.nnodes != 1:
            raise NotImplementedError(f"rollout {ROLLOUT_NAME} replicas span one node, not {self.nnodes}")
        server = self.server_class.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            ),
            name=_server_name(self.replica_rank, 0),
            max_concurrency=self.max_concurrency,
        ).remote(
            config=self.config,
            model_config=self.model_config,
            rollout_mode=self.rollout_mode,
            replica_rank=self.replica_rank,
            node_rank=0,
        )
        await server.launch_server.remote()
        self.servers = [server]
        self._server_handle = server
        address, port = await server.get_server_address.remote()
        self._server_address = f"{address}:{port}"


def register() -> None:
    """Register ``hf_cpu`` in verl's rollout registries (idempotent)."""
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFCPUServerAdapter"
    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFCPUReplica)
