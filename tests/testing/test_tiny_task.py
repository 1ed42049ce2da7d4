"""The tiny copy task: reward by hand, tokenizer and chat template as verl's agent loop uses them, data read
by verl's own RLHFDataset."""

import pytest

from verl_cppo.testing import tiny_task as T


@pytest.mark.parametrize(
    ("solution", "truth", "expected"),
    [
        ("a a a a a a a a", "a", 1.0),
        ("a a a a a a a a a a", "a", 1.0),  # only the first ANSWER_LENGTH words count
        ("a b a b", "a", 2 / 8),
        ("b c d \n", "a", 0.0),
        ("", "c", 0.0),
        ("c \n c c", "c", 3 / 8),  # a newline token decodes to whitespace, not to a word
    ],
)
def test_compute_score_by_hand(solution, truth, expected):
    assert T.compute_score(T.DATA_SOURCE, solution, truth) == expected


def test_compute_score_refuses_other_data_sources():
    with pytest.raises(ValueError, match="data_source"):
        T.compute_score("openai/gsm8k", "a", "a")


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    paths = T.build(str(tmp_path), n_train=8, n_val=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["model"])  # what verl's hf_tokenizer does
    ids = tok.apply_chat_template([{"role": "user", "content": "c"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    expected = ["<|im_start|>", "user", "\n", "c", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert tok.convert_ids_to_tokens(ids) == expected
    assert tok.encode("\n", add_special_tokens=False) == [T.VOCAB.index("\n")]  # verl's Qwen builder needs it
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    answer = [T.VOCAB.index(s) for s in ("b", "b", "a")] + [tok.eos_token_id]
    text = tok.decode(answer, skip_special_tokens=True)
    assert T.compute_score(T.DATA_SOURCE, text, "b") == 2 / 8


def test_verl_dataset_reads_the_parquet(tmp_path):
    paths = T.build(str(tmp_path), n_train=16, n_val=4)
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tok = AutoTokenizer.from_pretrained(paths["model"])
    config = OmegaConf.create({"max_prompt_length": 16, "filter_overlong_prompts": True, "truncation": "error"})
    dataset = RLHFDataset(data_files=[paths["train"]], tokenizer=tok, config=config)
    assert len(dataset) == 16
    row = dataset[0]
    assert row["data_source"] == T.DATA_SOURCE
    assert row["raw_prompt"][0]["content"] in T.SYMBOLS
    assert row["reward_model"]["ground_truth"] == row["raw_prompt"][0]["content"]


def test_unsolvable_prompts_score_zero_for_every_answer(tmp_path):
    import pandas as pd

    paths = T.write_data(str(tmp_path), n_train=12, n_val=4, unsolvable_every=4)
    train, val = pd.read_parquet(paths["train"]), pd.read_parquet(paths["val"])
    truths = [row["ground_truth"] for row in train["reward_model"]]
    assert [t == T.UNSOLVABLE for t in truths] == [False, False, False, True] * 3
    assert all(row["ground_truth"] in T.SYMBOLS for row in val["reward_model"])  # validation stays solvable
    assert T.UNSOLVABLE not in T.VOCAB
    for symbol in T.SYMBOLS:  # not even a perfect copy of the prompt's symbol scores
        assert T.compute_score(T.DATA_SOURCE, " ".join([symbol] * T.ANSWER_LENGTH), T.UNSOLVABLE) == 0.0
    with pytest.raises(ValueError, match="unsolvable_every must be >= 0, got -1"):
        T.write_data(str(tmp_path), n_train=4, n_val=4, unsolvable_every=-1)
