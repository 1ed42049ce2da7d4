"""examples/data/prepare_data.py: conversion to verl's RL parquet (read back with verl's own RLHFDataset), and a
fast, clear failure when the Hugging Face Hub cannot be reached (no network to it here)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from omegaconf import OmegaConf

from examples.data import prepare_data
from tests.support import REPO_ROOT
from verl_cppo.math_task.reward import compute_score

ROOT = REPO_ROOT
SCRIPT = os.path.join(ROOT, "examples", "data", "prepare_data.py")


def _dapo_raw(tmp_path):
    """DAPO-Math-17k's published layout: verl-format rows, every problem repeated (100x there, 3x here)."""
    rows = []
    for copy in range(3):
        for i, answer in enumerate(["34", "\\frac{1}{2}"]):
            rows.append(
                {
                    "data_source": "math_dapo",
                    "prompt": [{"role": "user", "content": f"Solve problem {i}. Answer: $Answer"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": f"uuid-{i}", "copy": copy},
                }
            )
    path = tmp_path / "dapo_raw.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _aime_raw(tmp_path):
    """A plain problem / answer table (MathArena-style columns, integer answers)."""
    path = tmp_path / "aime_raw.jsonl"
    rows = [{"problem_idx": 1, "problem": "Find $x$ if $x+1=8$.", "answer": 7}, {"problem_idx": 2, "problem": "P2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_conversion_schema_and_dedup(tmp_path):
    out = tmp_path / "out"
    sources = ["--source", f"dapo={_dapo_raw(tmp_path)}", "--source", f"aime2026={_aime_raw(tmp_path)}"]
    code = prepare_data.main(["--out-dir", str(out), "--datasets", "dapo", "aime2026", *sources])
    assert code == 0
    dapo = pd.read_parquet(out / "dapo-math-17k.parquet")
    assert len(dapo) == 2  # 6 raw rows, 2 distinct source ids
    assert list(dapo.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = dapo.iloc[1]
    assert row["data_source"] == "math_dapo"
    assert list(row["prompt"]) == [{"role": "user", "content": "Solve problem 1. Answer: $Answer"}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "\\frac{1}{2}"}
    assert row["extra_info"] == {"split": "train", "index": "uuid-1"}

    aime = pd.read_parquet(out / "aime-2026.parquet")
    assert len(aime) == 1  # the row without an answer cannot be scored and is dropped
    content = aime.iloc[0]["prompt"][0]["content"]
    assert content == prepare_data.PROMPT_TEMPLATE.format(problem="Find $x$ if $x+1=8$.")
    assert aime.iloc[0]["reward_model"]["ground_truth"] == "7"
    assert aime.iloc[0]["extra_info"] == {"split": "test", "index": "1"}


def test_verl_rlhf_dataset_reads_the_output_and_the_reward_scores_it(tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    out = tmp_path / "out"
    prepare_data.main(["--out-dir", str(out), "--datasets", "aime2025", "--source", f"aime2025={_aime_raw(tmp_path)}"])
    config = OmegaConf.create(
        {"prompt_key": "prompt", "filter_overlong_prompts": False, "cache_dir": str(tmp_path / "cache")}
    )
    dataset = RLHFDataset(str(out / "aime-2025.parquet"), tokenizer=None, config=config)
    item = dataset[0]
    assert item["data_source"] == "aime2025"
    assert item["raw_prompt"][0]["role"] == "user" and "x+1=8" in item["raw_prompt"][0]["content"]
    truth = item["reward_model"]["ground_truth"]
    assert compute_score(item["data_source"], "x = 7\nAnswer: 7", truth)["score"] == 1.0
    assert compute_score(item["data_source"], "Answer: 8", truth)["score"] == 0.0


def _run(env_extra, tmp_path, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP", "HTTPS", "ALL_PROXY"))}
    env.update({"HF_HOME": str(tmp_path / "hf"), **env_extra})
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, SCRIPT, "--out-dir", str(tmp_path / "out"), "--datasets", "aime2024"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return out, time.monotonic() - start


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_with_a_clear_message(tmp_path):
    out, seconds = _run({"HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}, tmp_path)  # connection refused
    assert out.returncode == 2
    assert "cannot reach the Hugging Face Hub" in out.stderr and "--source NAME=/path" in out.stderr
    assert seconds < 30
    assert not (tmp_path / "out").exists()


def test_silent_hub_times_out_instead_of_hanging(tmp_path):
    """An endpoint that accepts the connection and never answers (a black-holing proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "CPPO_HUB_TIMEOUT": "2"}
        out, seconds = _run(env, tmp_path)
    finally:
        server.close()
    assert out.returncode == 2
    assert "cannot reach the Hugging Face Hub" in out.stderr and "timed out" in out.stderr
    assert seconds < 30


def test_offline_mode_without_cache_says_so(tmp_path):
    out, _ = _run({"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert out.returncode == 2
    assert "could not load aime2024 from 'HuggingFaceH4/aime_2024'" in out.stderr
    assert "not in the local hub cache" in out.stderr


def test_bad_source_argument_is_rejected(capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["--source", "aime1999=x.parquet"])
    assert "--source expects NAME=ID_OR_FILE" in capsys.readouterr().err
