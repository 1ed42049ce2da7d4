"""A synthetic task that a tiny random-initialised model learns within tens of RL steps on CPU.

Task ("copy"): the prompt is one symbol X drawn from ``SYMBOLS``; the answer should repeat X for
``ANSWER_LENGTH`` tokens. The reward is the fraction of the first ``ANSWER_LENGTH`` response words equal to
X (0 for an empty response), so it is verifiable, dense enough for group-relative advantages to be informative
from the first step, and starts near chance (1 / vocabulary size) for a random model.

Everything is built locally from a config (no download):

* tokenizer: word-level over ``VOCAB`` (``tokenizers``), wrapped in ``PreTrainedTokenizerFast`` with a
  ChatML-style chat template (verl's Qwen continuous-token builder needs ``<|im_end|>``);
* model: ``Qwen3ForCausalLM`` with 2 layers, hidden size 64 (head size 16, or 32 for vLLM's CPU attention), tied
  embeddings, seeded initialisation (Qwen3, not
  Qwen2: transformers 5 always rebuilds a byte-level BPE ``Qwen2Tokenizer`` for model_type qwen2, while for
  qwen3 it loads the saved word-level tokenizer as is);
* data: verl RLHF parquet rows (``prompt`` messages, ``data_source``, ``reward_model.ground_truth``,
  ``extra_info``), read by verl's ``RLHFDataset``;
* reward: ``compute_score`` here, loaded by verl's reward loop through
  ``reward.custom_reward_function.path=pkg://verl_cppo.testing.tiny_task``.

    python -m verl_cppo.testing.tiny_task OUTDIR     # OUTDIR/model, OUTDIR/train.parquet, OUTDIR/val.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import random

__all__ = [
    "ANSWER_LENGTH",
    "DATA_SOURCE",
    "SYMBOLS",
    "UNSOLVABLE",
    "build_model",
    "build_tokenizer",
    "compute_score",
    "write_data",
]

DATA_SOURCE = "verl_cppo/copy"
SYMBOLS = tuple("abcd")
UNSOLVABLE = "<unsolvable>"
"""The ground truth of an unsolvable prompt (``write_data``): not a word of VOCAB, so no answer matches it."""
ANSWER_LENGTH = 8
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, turn start, turn end = eos
VOCAB = (*SPECIAL, "\n", "user", "assistant", *SYMBOLS)
CHAT_TEMPLATE = (  # ChatML, as Qwen's: verl's Qwen continuous-token builder relies on "<|im_end|>" and "\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """verl custom reward: fraction of the first ANSWER_LENGTH words of the response equal to ground_truth."""
    if data_source != DATA_SOURCE:
        raise ValueError(f"compute_score is for data_source {DATA_SOURCE!r}, got {data_source!r}")
    words = solution_str.split()[:ANSWER_LENGTH]
    return sum(word == ground_truth for word in words) / ANSWER_LENGTH


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(  # words are space-separated; "\n" is a word of its own
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.add_special_tokens(list(SPECIAL))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=SPECIAL[0], eos_token=SPECIAL[2], unk_token=SPECIAL[0]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    max_positions: int = 64,
):
    """The seeded random Qwen3 of the task; ``vocab_size`` (default: the task's VOCAB) widens its vocabulary for
    benchmarks whose K must be a real choice (the task's tokenizer then covers only the first ids).
    ``max_positions`` bounds prompt + response (vLLM's max_model_len follows it); RoPE has no weights, so it
    does not change the seeded initialisation."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size or len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim or hidden_size // 4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=VOCAB.index("<|im_start|>"),
        eos_token_id=VOCAB.index("<|im_end|>"),
        pad_token_id=VOCAB.index("<|endoftext|>"),
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id
    )
    return model


def write_data(outdir: str, n_train: int, n_val: int, seed: int = 0, unsolvable_every: int = 0) -> dict[str, str]:
    """verl RLHF parquet files with prompts cycling through SYMBOLS in a seeded order.

    ``unsolvable_every`` = k > 0 makes every k-th training prompt unsolvable: its ground truth is UNSOLVABLE, a
    word the tokenizer cannot write, so all its answers score 0 and ``cppo_grpo`` excludes its group (the
    all-fail prompts of real data sets)."""
    if unsolvable_every < 0:
        raise ValueError(f"unsolvable_every must be >= 0, got {unsolvable_every}")
    import pandas as pd

    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for index in range(n):
            symbol = rng.choice(SYMBOLS)
            unsolvable = split == "train" and unsolvable_every and index % unsolvable_every == unsolvable_every - 1
            truth = UNSOLVABLE if unsolvable else symbol
            rows.append(
                {
                    "data_source": DATA_SOURCE,
                    "prompt": [{"role": "user", "content": symbol}],
                    "ability": "copy",
                    "reward_model": {"style": "rule", "ground_truth": truth},
                    "extra_info": {"split": split, "index": index},
                }
            )
        paths[split] = os.path.join(outdir, f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(paths[split])
    return paths


def build(
    outdir: str,
    seed: int = 0,
    n_train: int = 1024,
    n_val: int = 64,
    head_dim: int | None = None,
    max_positions: int = 64,
    unsolvable_every: int = 0,
) -> dict[str, str]:
    """Write OUTDIR/model (weights + tokenizer) and the parquet files; returns their paths.

    ``head_dim``: None keeps hidden / heads = 16; vLLM's CPU attention needs >= 32. ``max_positions``: the
    longest prompt + response the model (and vLLM's max_model_len) allows. ``unsolvable_every``: see
    ``write_data``."""
    os.makedirs(outdir, exist_ok=True)
    model_dir = os.path.join(outdir, "model")
    build_model(seed, head_dim=head_dim, max_positions=max_positions).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    paths = {"model": model_dir, **write_data(outdir, n_train, n_val, seed, unsolvable_every)}
    with open(os.path.join(outdir, "task.json"), "w") as f:
        json.dump({"seed": seed, "symbols": SYMBOLS, "answer_length": ANSWER_LENGTH, **paths}, f, indent=1)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.outdir, seed=args.seed)))


if __name__ == "__main__":
    main()
