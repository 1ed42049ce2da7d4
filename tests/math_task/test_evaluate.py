"""``python -m verl_cppo.math_task.evaluate``: Avg@n / Pass@n against hand computations on fixed completions, and the
whole entry point end to end on CPU (``--engine hf``) on a tiny Qwen3 model built here from a config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.support import REPO_ROOT
from verl_cppo.math_task.evaluate import Question, format_table, score_completions, summarize
from verl_cppo.math_task.reward import compute_score
from verl_cppo.testing.launcher import TEST_ENV

ROOT = Path(REPO_ROOT)


def _problem(source, truth):
    return Question(source, [{"role": "user", "content": "q"}], truth)


# Fixed completions and, written out by hand, what math-verify must score them (the DAPO "Answer:" line,
# else the last \boxed{}; 1/2 = 0.5 = \frac{1}{2}).
FIXED = [
    (_problem("aime2024", "7"), ["Answer: 7", "Answer: 8", "so \\boxed{7}", "no answer here"], [1, 0, 1, 0]),
    (_problem("aime2024", "1/2"), ["Answer: 0.5", "Answer: \\frac{1}{2}", "Answer: 2", "Answer: 1/2"], [1, 1, 0, 1]),
    (_problem("aime2025", "42"), ["Answer: 41", "Answer: 24", "42", "Answer: 43"], [0, 0, 0, 0]),
    (_problem("aime2025", "3"), ["Answer: 3"] * 4, [1, 1, 1, 1]),
    (_problem("aime2025", "100"), ["Answer: 10", "Answer: 100", "Answer: 1000", "Answer:"], [0, 1, 0, 0]),
]


def test_avg_at_n_of_fixed_completions_by_hand():
    problems = [p for p, _, _ in FIXED]
    scores = score_completions(problems, [c for _, c, _ in FIXED])
    assert scores == [[float(v) for v in expected] for _, _, expected in FIXED]
    summary = summarize(problems, scores)
    # aime2024: (2/4 + 3/4) / 2; aime2025: (0 + 4/4 + 1/4) / 3; average over the two years, unweighted
    assert summary["n"] == 4
    s24, s25 = summary["sources"]["aime2024"], summary["sources"]["aime2025"]
    assert (s24["problems"], s24["samples"], s25["problems"], s25["samples"]) == (2, 8, 3, 12)
    assert s24["avg@4"] == pytest.approx(0.625) and s24["pass@4"] == 1.0
    assert s25["avg@4"] == pytest.approx(5 / 12) and s25["pass@4"] == pytest.approx(2 / 3)
    assert summary["average"]["avg@4"] == pytest.approx((0.625 + 5 / 12) / 2)
    assert summary["average"]["pass@4"] == pytest.approx((1 + 2 / 3) / 2)
    assert summary["average"]["over"] == ["aime2024", "aime2025"]
    table = format_table(summary)
    assert "Avg@4" in table and "62.50" in table and "41.67" in table and f"{100 * (0.625 + 5 / 12) / 2:.2f}" in table


def test_unequal_sample_counts_are_refused():
    with pytest.raises(ValueError, match="same positive number of samples"):
        summarize([_problem("aime2024", "1"), _problem("aime2024", "2")], [[1.0, 0.0], [1.0]])


# ---------------------------------------------------------------------------------------------- end to end

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB = (*SPECIAL, "\n", "user", "assistant", "Answer:", "7", "8")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_model(directory: Path) -> None:
    """A 2-layer Qwen3 with a word-level tokenizer whose words can form "Answer: 7" (random weights)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=SPECIAL[0]))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    core.add_special_tokens(list(SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL[0], eos_token=SPECIAL[2])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _parquet(path: Path, source: str, truths: list[str]) -> None:
    rows = [
        {
            "data_source": source,
            "prompt": [{"role": "user", "content": "user"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"index": i},
        }
        for i, truth in enumerate(truths)
    ]
    pd.DataFrame(rows).to_parquet(path)


def _run(*args, timeout=300, path_first=None):
    if "--max-tokens" not in args and "--help" not in args:  # required: the run's response length
        args = (*args, "--max-tokens", "8")
    path = [p for p in (path_first, str(ROOT), os.environ.get("PYTHONPATH", "")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env.update({**TEST_ENV, "OMP_NUM_THREADS": "1"})
    return subprocess.run(
        [sys.executable, "-m", "verl_cppo.math_task.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    _tiny_model(tmp / "model")
    _parquet(tmp / "aime-2024.parquet", "aime2024", ["7", "8"])
    _parquet(tmp / "aime-2025.parquet", "aime2025", ["7"])
    data = f"{tmp / 'aime-2024.parquet'},{tmp / 'aime-2025.parquet'}"
    n = 8
    out = _run(
        *("--model", str(tmp / "model"), "--data", data, "--engine", "hf", "--n", str(n), "--max-tokens", "5"),
        *("--output", str(tmp / "report.json"), "--save-generations", str(tmp / "gens.jsonl"), "--batch-size", "2"),
    )
    return tmp, n, out


def test_end_to_end_on_cpu_with_the_hf_engine(tiny_eval):
    tmp, n, out = tiny_eval
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads((tmp / "report.json").read_text())
    lines = [json.loads(line) for line in (tmp / "gens.jsonl").read_text().splitlines()]
    assert [line["data_source"] for line in lines] == ["aime2024", "aime2024", "aime2025"]
    assert all(len(line["completions"]) == n and len(line["scores"]) == n for line in lines)
    # independent of the module's scoring and averaging: re-score the saved completions with the reward
    # function itself and average by hand, per year and over the years
    by_source = {}
    for line in lines:
        rescored = [compute_score(line["data_source"], c, line["ground_truth"])["score"] for c in line["completions"]]
        assert rescored == line["scores"]
        by_source.setdefault(line["data_source"], []).append(sum(rescored) / n)
    expected = {source: sum(v) / len(v) for source, v in by_source.items()}
    assert report["n"] == n and report["engine"] == "hf"
    for source, value in expected.items():
        assert report["sources"][source][f"avg@{n}"] == pytest.approx(value)
        assert report["sources"][source]["samples"] == n * len(by_source[source])
    assert report["average"][f"avg@{n}"] == pytest.approx(sum(expected.values()) / 2)
    assert f"Avg@{n}" in out.stdout and "average (2 sources)" in out.stdout
    # the completions are the model's own text (the vocabulary's words), not empty strings
    assert any(c.strip() for line in lines for c in line["completions"])


def test_vllm_engine_without_vllm_stops_with_a_clear_error(tiny_eval, tmp_path):
    """vLLM is installed in the project's environment; a package first on the path that fails to import stands
    for a machine without it."""
    hidden = tmp_path / "no_vllm" / "vllm"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'vllm'\")\n")
    tmp, _, _ = tiny_eval
    args = ("--model", str(tmp / "model"), "--data", str(tmp / "aime-2024.parquet"))
    out = _run(*args, timeout=120, path_first=str(hidden.parent))
    assert out.returncode != 0
    assert "--engine vllm needs vLLM" in out.stderr and "--engine hf" in out.stderr


def test_a_verl_checkpoint_directory_is_refused_with_the_merge_command(tmp_path, tiny_eval):
    ckpt = tmp_path / "global_step_10" / "actor"
    (ckpt / "huggingface").mkdir(parents=True)
    data = str(tiny_eval[0] / "aime-2024.parquet")
    out = _run("--model", str(tmp_path / "global_step_10"), "--data", data, "--engine", "hf", timeout=120)
    assert out.returncode != 0
    assert f"python -m verl.model_merger merge --backend fsdp --local_dir {ckpt}" in out.stderr


def test_help():
    out = _run("--help", timeout=120)
    assert out.returncode == 0 and "--engine {hf,vllm}" in out.stdout and "Avg@n" in out.stdout
    help_text = " ".join(out.stdout.split())
    for default in ("samples per problem (Avg@n) (default: 16)", "(default: vllm)", "(default: 1.0)"):
        assert default in help_text, default


def test_max_tokens_is_the_runs_response_length_never_a_silent_default():
    """A default of 8192 silently truncated the 30B script's 16k-token answers: the length is asked for, and
    --help names each example script's value, read from the scripts themselves."""
    import re

    from verl_cppo.math_task.evaluate import build_parser

    scripts = {p.name: p.read_text() for p in (ROOT / "examples").glob("run_*.sh")}
    lengths = {
        n: int(re.search(r"MAX_RESPONSE_LENGTH=\$\{MAX_RESPONSE_LENGTH:-(\d+)\}", t)[1]) for n, t in scripts.items()
    }
    assert sorted(set(lengths.values())) == [8192, 16384], lengths
    (action,) = [a for a in build_parser()._actions if a.dest == "max_tokens"]
    assert action.required and action.default is None
    assert "8192 for the 1.7B / 8B scripts, 16384 for the 30B" in action.help
    assert lengths["run_qwen3_30b_a3b_base_megatron.sh"] == 16384
    assert {lengths[n] for n in lengths if "30b" not in n} == {8192}
    out = subprocess.run(
        [sys.executable, "-m", "verl_cppo.math_task.evaluate", "--model", "m", "--data", "d"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "the following arguments are required: --max-tokens" in out.stderr


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.fixture
def good_data(tmp_path):
    path = tmp_path / "aime-2024.parquet"
    _parquet(path, "aime2024", ["7"])
    return str(path)


def _bad_arguments(tmp_path, good_data):
    """(argv, the argument and value the one-line error must name), each a mistake a user makes."""
    not_parquet = tmp_path / "aime.jsonl"
    not_parquet.write_text('{"prompt": "x"}\n')
    wrong_columns = tmp_path / "other.parquet"
    pd.DataFrame([{"question": "q", "answer": "7"}]).to_parquet(wrong_columns)
    no_model = str(tmp_path / "no" / "such" / "model")
    a_file = str(not_parquet)
    return [
        (["--model", no_model, "--data", good_data], f"--model {no_model!r}: no such directory"),
        (["--model", "./ckpt/hf", "--data", good_data], "--model './ckpt/hf': no such directory"),
        (["--model", a_file, "--data", good_data], f"--model {a_file!r}: a file"),
        (
            ["--model", str(tmp_path), "--data", str(not_parquet)],
            f"--data: {str(not_parquet)!r} is not a readable parquet",
        ),
        (
            ["--model", str(tmp_path), "--data", str(wrong_columns)],
            f"--data: {str(wrong_columns)!r} row 0: not verl's RL",
        ),
        (
            ["--model", str(tmp_path), "--data", good_data + ",missing.parquet"],
            "--data: not found: ['missing.parquet']",
        ),
        (["--model", str(tmp_path), "--data", ","], "--data ',': no file given"),
        (["--model", str(tmp_path), "--data", good_data, "--n", "0"], "--n 0: must be >= 1"),
        (
            ["--model", str(tmp_path), "--data", good_data, "--chat-template-kwargs", "{x"],
            "--chat-template-kwargs '{x'",
        ),
        (["--model", str(tmp_path), "--data", good_data, "--tokenizer", no_model], f"--tokenizer {no_model!r}"),
    ]


def test_every_bad_argument_is_one_line_naming_it(tmp_path, good_data):
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face directory as far as the checks go
    from verl_cppo.math_task.evaluate import main

    for argv, named in _bad_arguments(tmp_path, good_data):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--engine", "hf", "--max-tokens", "8"])
        message = str(info.value.code)
        assert message.startswith("python -m verl_cppo.math_task.evaluate: error: ") and "\n" not in message, message
        assert named in message, (named, message)


def test_from_the_command_line_a_missing_model_or_a_non_parquet_file_is_one_line(tmp_path, good_data):
    """Before: a missing path went to the Hub as a model id, a JSONL file into pyarrow: 28-65-line tracebacks."""
    text = tmp_path / "aime.jsonl"
    text.write_text("{}\n")
    missing = _run("--model", str(tmp_path / "missing"), "--data", good_data, "--engine", "hf", timeout=120)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    non_parquet = _run("--model", str(tmp_path / "m"), "--data", str(text), "--engine", "hf", timeout=120)
    unknown_hub_id = _run("--model", "no-such-org/no-such-model", "--data", good_data, "--engine", "hf", timeout=120)
    for out, named in [
        (missing, f"--model {str(tmp_path / 'missing')!r}: no such directory"),
        (non_parquet, f"--data: {str(text)!r} is not a readable parquet file"),
        (unknown_hub_id, "--model 'no-such-org/no-such-model': cannot load a tokenizer from it"),
    ]:
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and named in lines[0], out.stderr[-3000:]
