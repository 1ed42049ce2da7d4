"""Evaluate a checkpoint the paper's way: n samples per AIME problem, math-verify reward, Avg@n per year and averaged.

    python -m verl_cppo.math_task.evaluate --model /ckpts/run/global_step_200/hf \\
        --data ~/verl/data/aime-2024.parquet,~/verl/data/aime-2025.parquet,~/verl/data/aime-2026.parquet \\
        --n 16 --max-tokens 8192 --tp 1 --output eval.json

Design:

* Data: the validation parquet files of ``examples/data/prepare_data.py`` (verl's RL format: ``data_source``,
  ``prompt`` chat messages, ``reward_model.ground_truth``), so the prompts are exactly those of training-time
  validation. Each prompt is rendered with the model tokenizer's chat template (``add_generation_prompt``)
  and tokenized without extra special tokens, as verl's agent loop does.
* Generation: ``--engine vllm`` (default) runs vLLM's offline ``LLM.generate`` with one request per problem
  and ``SamplingParams(n=...)``; ``--engine hf`` runs Hugging Face ``generate`` (slow; for machines without
  vLLM, e.g. the CPU test on a tiny model). The engine is never switched silently: ``vllm`` without vLLM
  installed stops with a message. Defaults are the example scripts' validation settings: temperature 1.0,
  top-p 1.0, no top-k. Both engines return token ids, decoded here with ``skip_special_tokens=True``, as
  verl's reward loop decodes responses.
* Scoring: ``verl_cppo.math_task.reward.compute_score`` (the training reward) on each decoded completion, with
  the same bounds as in training (math-verify in child processes, a deadline and a memory limit per answer).
* Report: per data source, Avg@n = mean over problems of the fraction of the n samples scored 1 (= verl's
  ``val-core/<source>/acc/mean@n``), and Pass@n = share of problems with at least one correct sample; the
  average over data sources is unweighted, as the paper averages its AIME columns (and as
  ``verl_cppo.trainer.val_metrics`` logs ``val-core/aime_avg/acc/mean@n`` during training). A JSON report
  (``--output``), a printed table (percent) and, with ``--save-generations``, one JSONL line per problem
  with its completions and scores.

A verl training checkpoint (``global_step_<N>/actor``) holds sharded FSDP / Megatron states, not a Hugging
Face model: merge it first (``python -m verl.model_merger merge --backend fsdp --local_dir
.../global_step_<N>/actor --target_dir .../global_step_<N>/hf``); given such a directory, this tool says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

__all__ = ["Question", "load_questions", "main", "score_completions", "summarize"]


@dataclass
class Question:
    """One evaluation item (an AIME problem): its data source (the AIME year), prompt and ground truth."""

    data_source: str
    messages: list[dict]
    ground_truth: str
    extra_info: dict = field(default_factory=dict)


def _as_list(value) -> list:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def load_questions(paths: list[str], limit: int | None = None) -> list[Question]:
    """The questions of verl RL parquet files (``limit``: at most that many per file, for smoke tests).

    ValueError naming the file for one that is not parquet or lacks verl's RL columns."""
    import pandas as pd

    problems = []
    for path in paths:
        try:
            frame = pd.read_parquet(os.path.expanduser(path))
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path!r} is not a readable parquet file ({first})") from exc
        if limit is not None:
            frame = frame.head(limit)
        for index, row in enumerate(frame.to_dict("records")):
            try:
                messages = [dict(m) for m in _as_list(row["prompt"])]
                ground_truth = row["reward_model"]["ground_truth"]
                source = row["data_source"]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{path!r} row {index}: not verl's RL format (data_source, prompt chat messages, "
                    f"reward_model.ground_truth): {type(exc).__name__} {exc}"
                ) from exc
            if ground_truth is None:
                raise ValueError(f"{path!r} row {index}: reward_model.ground_truth is missing")
            extra = row.get("extra_info")
            problems.append(
                Question(
                    data_source=str(source),
                    messages=messages,
                    ground_truth=str(ground_truth),
                    extra_info=dict(extra) if isinstance(extra, dict) else {},
                )
            )
    return problems


def score_completions(problems: list[Question], completions: list[list[str]]) -> list[list[float]]:
    """``verl_cppo.math_task.reward`` scores (1.0 / 0.0) of each problem's completions."""
    from verl_cppo.math_task.reward import compute_score

    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    return [
        [float(compute_score(p.data_source, text, p.ground_truth, p.extra_info)["score"]) for text in texts]
        for p, texts in zip(problems, completions)
    ]


def summarize(problems: list[Question], scores: list[list[float]]) -> dict:
    """Avg@n and Pass@n per data source (in order of first appearance) and their unweighted average."""
    per_source: dict[str, list[list[float]]] = {}
    for problem, problem_scores in zip(problems, scores, strict=True):
        per_source.setdefault(problem.data_source, []).append(problem_scores)
    ns = {len(s) for s in scores}
    if len(ns) != 1 or 0 in ns:
        raise ValueError(f"every problem needs the same positive number of samples, got {sorted(ns)}")
    n = ns.pop()
    sources = {}
    for source, rows in per_source.items():
        sources[source] = {
            "problems": len(rows),
            "samples": sum(len(r) for r in rows),
            f"avg@{n}": sum(sum(r) / n for r in rows) / len(rows),
            f"pass@{n}": sum(any(v > 0 for v in r) for r in rows) / len(rows),
        }
    average = {key: sum(s[key] for s in sources.values()) / len(sources) for key in (f"avg@{n}", f"pass@{n}")}
    return {"n": n, "sources": sources, "average": {**average, "over": list(sources)}}


def format_table(summary: dict) -> str:
    n = summary["n"]
    lines = [f"{'data source':<24} {'problems':>8} {'samples':>8} {f'Avg@{n}':>8} {f'Pass@{n}':>8}"]
    for source, s in summary["sources"].items():
        avg_n, pass_n = 100 * s[f"avg@{n}"], 100 * s[f"pass@{n}"]
        lines.append(f"{source:<24} {s['problems']:>8} {s['samples']:>8} {avg_n:>8.2f} {pass_n:>8.2f}")
    avg = summary["average"]
    label = f"average ({len(avg['over'])} sources)"
    lines.append(f"{label:<24} {'':>8} {'':>8} {100 * avg[f'avg@{n}']:>8.2f} {100 * avg[f'pass@{n}']:>8.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- engines


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _check_model_dir(path: str, argument: str = "--model") -> None:
    """A clear error for a missing local path or a verl training checkpoint given instead of a Hugging Face model."""
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        if _HUB_ID.match(path) and ".." not in path:
            return  # a Hub id (org/name): loading it says whether it exists
        raise SystemExit(f"{argument} {path!r}: no such directory (nor a Hugging Face Hub id, org/name)")
    if not os.path.isdir(local):
        raise SystemExit(f"{argument} {path!r}: a file, not a Hugging Face model directory")
    if os.path.exists(os.path.join(local, "config.json")):
        return  # a Hugging Face directory
    actor = os.path.join(local, "actor") if os.path.isdir(os.path.join(local, "actor")) else local
    if os.path.isdir(os.path.join(actor, "huggingface")) or os.path.basename(actor) == "actor":
        backend = "megatron" if os.path.isdir(os.path.join(actor, "dist_ckpt")) else "fsdp"
        raise SystemExit(
            f"{path} is a verl training checkpoint (sharded {backend} states), not a Hugging Face model. Merge it "
            f"first:\n  python -m verl.model_merger merge --backend {backend} --local_dir {actor} "
            f"--target_dir {os.path.join(os.path.dirname(actor.rstrip('/')), 'hf')}\nand pass --model <target_dir>."
        )
    raise SystemExit(f"{argument} {path!r} has no config.json: not a Hugging Face model directory")


def _prompt_ids(tokenizer, problems: list[Question], chat_template_kwargs: dict) -> list[list[int]]:
    ids = []
    for p in problems:
        text = tokenizer.apply_chat_template(
            p.messages, add_generation_prompt=True, tokenize=False, **chat_template_kwargs
        )
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def generate_vllm(args, tokenizer, prompts: list[list[int]]) -> list[list[list[int]]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise SystemExit(
            f"--engine vllm needs vLLM ({exc}); install it (pip install 'verl[vllm]==0.9.1') or pass --engine hf "
            "(Hugging Face generate, much slower)"
        ) from exc
    llm_kwargs = {
        "model": args.model,
        "tokenizer": args.tokenizer or args.model,
        "tensor_parallel_size": args.tp,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "seed": args.seed,
        "trust_remote_code": args.trust_remote_code,
        "dtype": args.dtype,
    }
    if args.max_model_len:
        llm_kwargs["max_model_len"] = args.max_model_len
    llm = LLM(**llm_kwargs)
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    return [[list(o.token_ids) for o in out.outputs] for out in outputs]


def generate_hf(args, tokenizer, prompts: list[list[int]]) -> list[list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code).to(
        device
    )
    model.eval()
    torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": args.temperature > 0, "top_k": max(args.top_k, 0)}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    results: list[list[list[int]]] = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=args.max_tokens,
                num_return_sequences=args.n,
                pad_token_id=pad,
                **sampling,
            )
        new = out[:, width:].tolist()
        for i in range(len(batch)):
            results.append(new[i * args.n : (i + 1) * args.n])
    return results


ENGINES = {"vllm": generate_vllm, "hf": generate_hf}


# ---------------------------------------------------------------------------------------------- entry


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # each default shown, except none (required, None, a flag)
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m verl_cppo.math_task.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="Data: examples/data/prepare_data.py writes aime-2024/2025/2026.parquet. Output: a table (percent) "
        "on stdout, --output JSON (fractions), --save-generations JSONL.",
        formatter_class=_DefaultsHelp,
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory or Hub id (merged checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (None: --model's)")
    parser.add_argument("--data", required=True, help="comma-separated parquet files (one data source each)")
    parser.add_argument("--n", type=int, default=16, help="samples per problem (Avg@n)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="vllm", help="generation engine")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the scripts' validation)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (the scripts' validation)")
    parser.add_argument("--top-k", type=int, default=-1, help="-1: no top-k truncation")
    length = "the run's MAX_RESPONSE_LENGTH: 8192 for the 1.7B / 8B scripts, 16384 for the 30B; shorter truncates"
    parser.add_argument("--max-tokens", type=int, required=True, help=f"max response tokens ({length})")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM (None: the model's)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--batch-size", type=int, default=8, help="hf engine: prompts per generate call")
    parser.add_argument("--trust-remote-code", action="store_true", help="passed to the tokenizer and model loaders")
    parser.add_argument("--chat-template-kwargs", default="{}", help="JSON apply_chat_template kwargs")
    parser.add_argument("--limit", type=int, default=None, help="at most this many problems per file (smoke test)")
    parser.add_argument("--output", default=None, help="write the JSON report here")
    parser.add_argument("--save-generations", default=None, help="write completions and scores (JSONL) here")
    return parser


def _fail(message: str) -> SystemExit:
    return SystemExit(f"python -m verl_cppo.math_task.evaluate: error: {message}")


def main(argv: list[str] | None = None) -> int:
    """The command line; every bad argument stops it with one line naming the argument and its value."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except SystemExit as exc:
        if isinstance(exc.code, str) and not exc.code.startswith("python -m verl_cppo.math_task.evaluate"):
            raise _fail(exc.code) from None
        raise


def _load_tokenizer(args):
    from transformers import AutoTokenizer

    name = args.tokenizer or args.model
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:  # a Hub id that is not there (or offline), a directory without one
        argument = "--tokenizer" if args.tokenizer else "--model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"{argument} {name!r}: cannot load a tokenizer from it ({first})") from None


def _main(args) -> int:
    for name in ("n", "max_tokens", "batch_size", "tp"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit {args.limit}: must be >= 1")
    try:
        chat_template_kwargs = json.loads(args.chat_template_kwargs)
    except ValueError as exc:
        raise SystemExit(f"--chat-template-kwargs {args.chat_template_kwargs!r}: not JSON ({exc})") from None
    if not isinstance(chat_template_kwargs, dict):
        raise SystemExit(f"--chat-template-kwargs {args.chat_template_kwargs!r}: must be a JSON object")
    paths = [p for p in args.data.split(",") if p]
    if not paths:
        raise SystemExit(f"--data {args.data!r}: no file given")
    missing = [p for p in paths if not os.path.isfile(os.path.expanduser(p))]
    if missing:
        raise SystemExit(f"--data: not found: {missing} (examples/data/prepare_data.py writes them)")
    _check_model_dir(args.model)
    if args.tokenizer:
        _check_model_dir(args.tokenizer, "--tokenizer")
    if args.engine == "vllm":  # fail before loading anything
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise SystemExit(
                f"--engine vllm needs vLLM ({exc}); install it (pip install 'verl[vllm]==0.9.1') or pass "
                "--engine hf (Hugging Face generate, much slower)"
            ) from exc
    start = time.time()
    try:
        problems = load_questions(paths, args.limit)
    except ValueError as exc:
        raise SystemExit(f"--data: {exc}") from None
    tokenizer = _load_tokenizer(args)
    prompts = _prompt_ids(tokenizer, problems, chat_template_kwargs)
    print(f"[evaluate] {len(problems)} problems x {args.n} samples, engine {args.engine}", file=sys.stderr)
    token_ids = ENGINES[args.engine](args, tokenizer, prompts)
    completions = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in row] for row in token_ids]
    scores = score_completions(problems, completions)
    summary = summarize(problems, scores)
    report = {
        "model": args.model,
        "engine": args.engine,
        "data": paths,
        "sampling": {
            "n": args.n,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        },
        **summary,
        "elapsed_s": round(time.time() - start, 1),
    }
    print(format_table(summary))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    if args.save_generations:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_generations)), exist_ok=True)
        with open(args.save_generations, "w") as f:
            for problem, texts, row in zip(problems, completions, scores):
                record = {
                    "data_source": problem.data_source,
                    "ground_truth": problem.ground_truth,
                    "completions": texts,
                    "scores": row,
                }
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
