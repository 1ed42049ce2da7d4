"""Rollout cost of mu's Top-K through verl's own vLLM server code, at the lengths and vocabularies users run.

What runs is what a verl 0.9.1 rollout replica runs, minus HTTP and Ray:

* engine arguments: verl's ``vLLMHttpServer.launch_server`` builds them from verl's rollout config (composed with
  Hydra from verl's ``ppo_trainer.yaml``, as ``main_ppo`` does) and parses them with vLLM's CLI parser; the
  benchmark takes the parsed namespace where verl would start its HTTP server and builds the ``AsyncLLM`` as
  verl's ``run_server`` does (tokenizer initialised, ``distributed_executor_backend=mp``: the EngineCore and
  the model worker run in processes of their own; this process is the frontend). On CPU the config also gets
  the CPU regression's overrides (``VLLM_CPU_OVERRIDES``: no sleep mode, eager) and float32.
* requests: verl's ``vLLMHttpServer.generate`` itself, with the Top-K diff applied (``install_topk_runtime``).
  k=0 is verl's own request (``logprobs=True`` -> vLLM ``logprobs=0``, detokenized, per-token ``Logprob``
  dicts); k=4 / k=20 are the Top-K path (``logprobs=K`` kept as arrays, ``verl_cppo.topk.vllm_arrays``).

Model: the tiny task's random 2-layer Qwen3 (``tiny_task.build_model``, head size 32) with a VOCAB-token
vocabulary and a word-level tokenizer covering all of it; ``--prompts`` prompts of 8 random tokens, each
generating exactly ``--tokens`` tokens (``min_tokens = max_tokens``). Per setting, after one warm-up call:

  tokens_per_s            generated tokens / wall seconds of one batch of all prompts (sent concurrently)
  frontend_us_per_token   CPU seconds of this process (all its threads) over that batch / generated tokens
  gc_s                    seconds spent in Python's garbage collector during that batch
  held_bytes_per_token    bytes the finished request holds for its log-probs (vLLM's ``CompletionOutput.logprobs``:
                          the Logprob dicts, or the Top-K arrays), deep size / its tokens, mean over requests

    flock /tmp/verl-cppo-heavy.lock timeout 900 .venv/bin/python -m benchmarks.bench_vllm_topk \\
        --vocab 8192 --tokens 1024 --prompts 16 [--k 0,4,20] [--json out.json]

Prints a table and one line per setting:
``RESULT vocab=<V> tokens=<n> k=<K> tokens_per_s=<x> frontend_us_per_token=<x> gc_s=<x> held_bytes_per_token=<x>``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time

PROMPT_LEN = 8


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=_ints, default=[8192], help="vocabulary sizes, comma-separated")
    parser.add_argument("--tokens", type=_ints, default=[1024], help="generated tokens per response, comma-separated")
    parser.add_argument("--prompts", type=int, default=16, help="responses per batch")
    parser.add_argument("--k", type=_ints, default=[0, 4, 20], help="K per setting; 0 = verl's own request")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--before",
        action="store_true",
        help="also run each K > 0 as the Top-K path did before the array processor (per-token Logprob dicts, "
        "every top-K id decoded; printed as BEFORE lines)",
    )
    args = parser.parse_args(argv)
    if args.prompts < 1 or min(args.vocab) < 64 or min(args.tokens) < 1 or max(args.k) > 20:
        parser.error("--prompts >= 1, --vocab >= 64, --tokens >= 1 and K <= 20 (vLLM's max_logprobs) are required")
    return args


class GcClock:
    """Seconds spent in Python's garbage collector while ``running`` and not ``paused``."""

    def __init__(self):
        self.seconds, self.running, self.paused, self._start = 0.0, False, False, None

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            if self.running and not self.paused:
                self.seconds += time.perf_counter() - self._start
            self._start = None


def deep_size(obj, seen: set | None = None) -> int:
    """Bytes of ``obj`` and everything it references (containers, instance dicts, numpy buffers), each once."""
    import numpy as np

    seen = set() if seen is None else seen
    stack, total = [obj], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or item is None or isinstance(item, type):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)  # an array that owns its data counts its buffer here too
        if isinstance(item, np.ndarray):
            if item.base is not None:
                stack.append(item.base)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.append(item.__dict__)
    return total


def build_model_dir(vocab: int, max_len: int) -> str:
    """A random tiny Qwen3 with ``vocab`` tokens and a word-level tokenizer covering every id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from verl_cppo.testing.tiny_task import SPECIAL, build_model

    model_dir = tempfile.mkdtemp(prefix=f"bench_vllm_topk_{vocab}_")
    model = build_model(seed=0, head_dim=32, vocab_size=vocab)
    model.config.max_position_embeddings = max_len
    model.save_pretrained(model_dir)
    words = [*SPECIAL, *(f"w{i}" for i in range(vocab - len(SPECIAL)))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL[0]))
    core.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    core.decoder = decoders.WordPiece(prefix="##")
    core.add_special_tokens(list(SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL[0], eos_token=SPECIAL[2])
    tokenizer.save_pretrained(model_dir)
    return model_dir


def verl_server(model_dir: str, tokens: int, prompts: int, cuda: bool, extra_overrides: tuple[str, ...] = ()):
    """verl's vLLMHttpServer with verl's config, and the engine arguments its ``launch_server`` parses."""
    from verl.utils.profiler import build_rollout_dist_profiler
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    from verl_cppo.launch.dry_run import compose_config
    from verl_cppo.testing.vllm_cpu import VLLM_CPU_OVERRIDES

    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        "data.max_prompt_length=16",
        f"data.max_response_length={tokens}",
        f"actor_rollout_ref.rollout.max_num_seqs={max(prompts, 1)}",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",  # one replica on one device
    ]
    if not cuda:
        overrides += [*VLLM_CPU_OVERRIDES, "actor_rollout_ref.rollout.dtype=float32"]
    config = compose_config([*overrides, *extra_overrides])
    server = object.__new__(vLLMHttpServer)
    server.config = server._init_config(config.actor_rollout_ref.rollout)
    server.model_config = server._init_model_config(config.actor_rollout_ref.model)
    server._validate_configs()
    server.replica_rank, server.node_rank, server.gpus_per_node, server.nnodes = 0, 0, 1, 1
    server.global_steps, server._admitting, server._submission_paused, server._rejecting = None, 0, False, False
    server._resume_event = asyncio.Event()
    server._resume_event.set()
    server._disaggregation_role, server._disaggregation_kv_transfer_config = "null", None
    server._pd_decode_peers = []
    server.profiler_controller = build_rollout_dist_profiler(0, 1, config=None, tool_config=None)
    parsed = {}

    async def capture(args):  # where verl's launch_server starts its HTTP server
        parsed["args"] = args

    server.run_server = capture
    asyncio.run(server.launch_server())
    return server, parsed["args"]


async def start_engine(args):
    """The AsyncLLM of verl's ``run_server``, from the parsed CLI namespace."""
    import inspect

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    fn_args = set(inspect.signature(AsyncLLM.from_vllm_config).parameters)
    kwargs = {key: getattr(engine_args, key) for key in ("enable_log_requests", "disable_log_stats") if key in fn_args}
    return AsyncLLM.from_vllm_config(vllm_config=vllm_config, usage_context=UsageContext.OPENAI_API_SERVER, **kwargs)


class HeldLogprobs:
    """Wraps the engine's ``generate``: records the deep size of each finished request's log-probs (outside the
    clocks: its CPU time is subtracted and the GC clock paused)."""

    def __init__(self, engine, gc_clock: GcClock):
        self.engine, self.gc_clock = engine, gc_clock
        self.bytes, self.tokens, self.cpu_excluded = 0, 0, 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def generate(self, *args, **kwargs):
        final = None
        async for output in self.engine.generate(*args, **kwargs):
            final = output
            if output.finished:
                start, self.gc_clock.paused = time.process_time(), True
                completion = output.outputs[0]
                self.bytes += deep_size(completion.logprobs)
                self.tokens += len(completion.token_ids)
                self.gc_clock.paused = False
                self.cpu_excluded += time.process_time() - start
            yield final


async def run_setting(
    server, k: int, prompts: list[list[int]], tokens: int, gc_clock: GcClock, before: bool = False
) -> dict:
    from verl_cppo import hooks
    from verl_cppo.topk.rollout import ENV_TOPK
    from verl_cppo.topk.setup import VLLM_ARRAYS_HOOK, vllm_arrays_wrapper

    if before:  # the frontend without the array processor: vLLM's own dicts, parsed position by position
        hooks.unwrap("vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request")
    else:
        hooks.wrap(
            "vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request", vllm_arrays_wrapper, name=VLLM_ARRAYS_HOOK
        )

    if k:
        os.environ[ENV_TOPK] = str(k)
    else:
        os.environ.pop(ENV_TOPK, None)  # verl's own request: the diff leaves it as verl makes it

    def params():
        return {"temperature": 1.0, "top_p": 1.0, "logprobs": True, "max_tokens": tokens, "min_tokens": tokens}

    warm = {**params(), "max_tokens": 16, "min_tokens": 16}
    await asyncio.gather(*(server.generate(p, dict(warm), f"warm-{k}-{i}") for i, p in enumerate(prompts[:2])))
    held = HeldLogprobs(server.engine, gc_clock)
    server.engine = held
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    gc_clock.seconds, gc_clock.running = 0.0, True
    outputs = await asyncio.gather(*(server.generate(p, params(), f"k{k}-{i}") for i, p in enumerate(prompts)))
    gc_clock.running = False
    cpu, wall = time.process_time() - cpu - held.cpu_excluded, time.perf_counter() - wall
    server.engine = held.engine
    generated = sum(len(o.token_ids) for o in outputs)
    if k:
        from verl_cppo.topk.rollout import TOPK_IDS

        shapes = {o.extra_fields[TOPK_IDS].shape for o in outputs}
        assert shapes == {(tokens, k)}, shapes
    return {
        "tokens_per_s": generated / wall,
        "frontend_us_per_token": 1e6 * cpu / generated,
        "gc_s": gc_clock.seconds,
        "held_bytes_per_token": held.bytes / max(held.tokens, 1),
        "generated": generated,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from verl_cppo.topk.rollout import ENV_TOPK
    from verl_cppo.topk.setup import install_topk_runtime

    os.environ[ENV_TOPK] = "20"
    install_topk_runtime()  # the Top-K diff and the vLLM array hook, as in a rollout server process
    cuda = torch.cuda.is_available()
    results = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            model_dir = build_model_dir(vocab, tokens + 16)
            server, engine_args = verl_server(model_dir, tokens, args.prompts, cuda)
            generator = torch.Generator().manual_seed(0)
            prompts = [
                torch.randint(len(SPECIAL_IDS), vocab, (PROMPT_LEN,), generator=generator).tolist()
                for _ in range(args.prompts)
            ]

            async def session(server=server, engine_args=engine_args, prompts=prompts, tokens=tokens):
                server.engine = await start_engine(engine_args)
                gc_clock = GcClock()
                gc.callbacks.append(gc_clock)
                try:
                    settings = [(k, False) for k in args.k] + [(k, True) for k in args.k if k and args.before]
                    return [
                        (k, before, await run_setting(server, k, prompts, tokens, gc_clock, before))
                        for k, before in settings
                    ]
                finally:
                    gc.callbacks.remove(gc_clock)
                    server.engine.shutdown()

            for k, before, row in asyncio.run(session()):
                results.append({"vocab": vocab, "tokens": tokens, "k": k, "before": before, **row})
    base = {(r["vocab"], r["tokens"]): r for r in results if r["k"] == 0}
    print(f"\n{args.prompts} prompts per setting, device {'cuda' if cuda else 'cpu'}")
    print("| vocab | tokens | K | tokens/s | x k=0 | frontend us/token | x k=0 | GC s | held B/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b = base.get((r["vocab"], r["tokens"]))
        rate = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        cpu = f"{r['frontend_us_per_token'] / b['frontend_us_per_token']:.2f}" if b else "-"
        print(
            f"| {r['vocab']:,} | {r['tokens']} | {r['k']}{' before' if r['before'] else ''} | "
            f"{r['tokens_per_s']:,.0f} | {rate} | "
            f"{r['frontend_us_per_token']:.1f} | {cpu} | {r['gc_s']:.3f} | {r['held_bytes_per_token']:.0f} |"
        )
    for r in results:
        print(
            f"{'BEFORE' if r['before'] else 'RESULT'} vocab={r['vocab']} tokens={r['tokens']} k={r['k']} "
            f"tokens_per_s={r['tokens_per_s']:.1f} "
            f"frontend_us_per_token={r['frontend_us_per_token']:.2f} gc_s={r['gc_s']:.4f} "
            f"held_bytes_per_token={r['held_bytes_per_token']:.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompts": args.prompts, "device": "cuda" if cuda else "cpu", "results": results}, f, indent=1)
    return 0


SPECIAL_IDS = (0, 1, 2)  # the tokenizer's special tokens: prompts use the other ids

if __name__ == "__main__":
    sys.exit(main())
