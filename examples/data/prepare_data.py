"""Prepare the paper's data in verl's RL parquet format: DAPO-Math-17k (train), AIME 2024/2025/2026 (validation).

    python examples/data/prepare_data.py                       # all four, into ~/verl/data
    python examples/data/prepare_data.py --out-dir /shared/data --datasets dapo aime2026
    python examples/data/prepare_data.py --source aime2026=/path/aime_2026.jsonl   # local file, no download

Run it once on a machine with access to the Hugging Face Hub (or a mirror via HF_ENDPOINT, or with the hub
cache already filled and HF_HUB_OFFLINE=1), on a file system every node of the cluster sees. Without access it
stops within seconds with a message naming the dataset and the way out; it never waits on the network for long.

Each output row is what verl 0.9.1's ``RLHFDataset`` and reward loop read::

    data_source   "math_dapo" | "aime2024" | "aime2025" | "aime2026"   (validation metrics are grouped by it)
    prompt        [{"role": "user", "content": <DAPO-Math instruction around the problem>}]
    ability       "MATH"
    reward_model  {"style": "rule", "ground_truth": <answer as a string>}
    extra_info    {"split": "train" | "test", "index": <source id>}

The public DAPO-Math-17k parquet repeats each of its 17,917 problems 100 times; rows are deduplicated on
``extra_info.index`` (``--keep-duplicates`` keeps them). AIME problems get the same instruction as the training
prompts, so the reward function (``verl_cppo.math_task.reward``) reads the answer the same way in both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable

# Bound every hub request before huggingface_hub / datasets are imported (they read these at import).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "20")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "60")

PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
"""DAPO-Math-17k's own instruction (its prompts already carry it; AIME problems are wrapped in it)."""

DATASETS = {
    # name: (default source, split, data_source, output file, is_train)
    "dapo": ("BytedTsinghua-SIA/DAPO-Math-17k", "train", "math_dapo", "dapo-math-17k.parquet", True),
    "aime2024": ("HuggingFaceH4/aime_2024", "train", "aime2024", "aime-2024.parquet", False),
    "aime2025": ("MathArena/aime_2025", "train", "aime2025", "aime-2025.parquet", False),
    "aime2026": ("MathArena/aime_2026", "train", "aime2026", "aime-2026.parquet", False),
}
PREFLIGHT_TIMEOUT_S = float(os.environ.get("CPPO_HUB_TIMEOUT", "10"))
"""Seconds the reachability check waits for the hub (CPPO_HUB_TIMEOUT)."""


class DataPrepError(RuntimeError):
    """A dataset could not be obtained or converted; the message says which and what to do."""


def _is_local(source: str) -> bool:
    return source.endswith((".parquet", ".json", ".jsonl")) or os.path.exists(source)


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_hub_reachable(endpoint: str | None = None, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Raise DataPrepError unless the hub endpoint answers HTTP within ``timeout`` seconds."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered (any status): the network path works
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad URLs
        raise DataPrepError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(exc).__name__}: {exc}). Run this script on a "
            "machine with internet access, point HF_ENDPOINT at a reachable mirror, set HF_HUB_OFFLINE=1 to use "
            "an already filled hub cache, or pass local files with --source NAME=/path/file.parquet"
        ) from exc


def _read_local(path: str) -> list[dict]:
    import pandas as pd

    if not os.path.exists(path):
        raise DataPrepError(f"local source {path!r} does not exist")
    if path.endswith(".parquet"):
        return pd.read_parquet(path).to_dict(orient="records")
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise DataPrepError(f"{path}: a .json source must hold a list of records")
    return data


def load_rows(name: str, source: str, split: str) -> list[dict]:
    """Raw rows of ``source``: a local parquet/json/jsonl file, or a Hub dataset id (downloaded)."""
    if _is_local(source):
        return _read_local(source)
    if not _offline():
        check_hub_reachable()
    try:
        import datasets
    except ImportError as exc:
        raise DataPrepError("downloading needs the `datasets` package (a dependency of verl)") from exc
    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as exc:
        hint = (
            "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and the dataset is not in the local hub cache: unset it "
            "on a connected machine"
            if _offline()
            else "check the dataset id (--source NAME=ID), your network or HF_ENDPOINT"
        )
        raise DataPrepError(
            f"could not load {name} from {source!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            f"{hint}, or pass a local file with --source {name}=/path/file.parquet"
        ) from exc


def _first(row: dict, keys: Iterable[str]):
    for key in keys:
        value = row.get(key)
        if value is not None and value != "":
            return value
    return None


def _problem_and_answer(row: dict) -> tuple[str | None, str | None]:
    answer = None
    if isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    if answer is None:
        answer = _first(row, ("answer", "Answer", "final_answer", "ground_truth"))
    problem = _first(row, ("problem", "Problem", "question", "Question"))
    return problem, None if answer is None else str(answer).strip()


def _source_id(row: dict, fallback: int):
    extra = row.get("extra_info")
    if isinstance(extra, dict) and extra.get("index") not in (None, ""):
        return extra["index"]
    value = _first(row, ("id", "ID", "problem_idx", "idx"))
    return fallback if value is None else value


def convert(rows: list[dict], data_source: str, is_train: bool, deduplicate: bool = True) -> list[dict]:
    """verl RL rows from raw rows (verl-format rows keep their prompt; others are wrapped in the template)."""
    out, seen = [], set()
    split = "train" if is_train else "test"
    for i, row in enumerate(rows):
        problem, answer = _problem_and_answer(row)
        prompt = row.get("prompt")
        if hasattr(prompt, "tolist"):  # numpy arrays from parquet
            prompt = prompt.tolist()
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        elif problem is not None:
            messages = [{"role": "user", "content": PROMPT_TEMPLATE.format(problem=str(problem).strip())}]
        else:
            messages = None
        if messages is None or not answer:
            continue  # nothing to ask or nothing to check against
        index = _source_id(row, i)
        if deduplicate:
            if index in seen:
                continue
            seen.add(index)
        out.append(
            {
                "data_source": data_source,
                "prompt": messages,
                "ability": "MATH",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": split, "index": str(index)},
            }
        )
    return out


def write_parquet(rows: list[dict], path: str) -> None:
    import pandas as pd

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def prepare(name: str, out_dir: str, source: str | None = None, deduplicate: bool = True) -> str:
    default_source, split, data_source, filename, is_train = DATASETS[name]
    rows = load_rows(name, source or default_source, split)
    converted = convert(rows, data_source, is_train, deduplicate=deduplicate)
    if not converted:
        raise DataPrepError(f"{name}: no usable rows in {source or default_source!r} (need a problem and an answer)")
    path = os.path.join(out_dir, filename)
    write_parquet(converted, path)
    print(f"{name}: {len(converted)} rows (from {len(rows)}) -> {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(os.path.expanduser("~"), "verl", "data"))
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=ID_OR_FILE",
        help="override a dataset's source: a Hub id or a local .parquet/.json/.jsonl file",
    )
    parser.add_argument("--keep-duplicates", action="store_true", help="keep repeated source ids")
    args = parser.parse_args(argv)
    sources = {}
    for item in args.source:
        name, sep, value = item.partition("=")
        if not sep or name not in DATASETS or not value:
            parser.error(f"--source expects NAME=ID_OR_FILE with NAME in {sorted(DATASETS)}, got {item!r}")
        sources[name] = value
    try:
        for name in args.datasets:
            prepare(name, os.path.expanduser(args.out_dir), sources.get(name), deduplicate=not args.keep_duplicates)
    except DataPrepError as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
