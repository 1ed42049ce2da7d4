"""A prefix-dependent reward for the tiny copy task: an early wrong token devalues every later token.

The task is ``verl_cppo.testing.tiny_task``'s (the prompt holds one symbol X; the answer should repeat X), but
scored over ``ANSWER_LENGTH`` = 64 words and with a credit that decays with the number of mistakes made so far:

    reward = (1 / L) * sum_t 1[y_t == X] * DECAY ** (number of wrong words among y_1 .. y_{t-1})

With DECAY = 0.9 a wrong first word takes 10% of the credit of every later word (0.11 of the reward), a wrong
last word costs 1 / L (0.016): 7.3x less. (The first round used 16 words and DECAY = 0.5, a ratio of 8.5x; the
longer answer keeps the reward about as prefix-dependent.) A response that ends early scores 0 for its missing
words. A perfect answer scores 1, a random model about 0.02 (each word is right with probability about 1/10
and mistakes accumulate).

Why this shape: the study asks whether CPPO's tighter trust region on early tokens matters. Under the plain copy
reward every position is worth the same, so a drift on the first tokens costs no more than one on the last;
here it costs several times more, and a tiny transformer that has learnt "repeat the previous word" also
propagates an early mistake forward, so the rollout policy's prefix errors compound in both the reward and the
model. The score stays dense (every correct word before the first mistake earns full credit), so group-relative
advantages carry signal from the first step, as in the original task.

Loaded by verl's reward loop through ``reward.custom_reward_function.path=<this file>``.
"""

from __future__ import annotations

ANSWER_LENGTH = 64
DECAY = 0.9
DATA_SOURCE = "verl_cppo/copy"  # the data rows are tiny_task's; only the scoring differs


def prefix_decayed_score(words: list[str], target: str, answer_length: int = ANSWER_LENGTH) -> float:
    """The reward above for an already split response."""
    credit, mistakes = 0.0, 0
    for word in words[:answer_length]:
        if word == target:
            credit += DECAY**mistakes
        else:
            mistakes += 1
    return credit / answer_length


def compute_score(
    data_source, solution_str, ground_truth, extra_info=None, answer_length: int = ANSWER_LENGTH, **kwargs
) -> float:
    """verl custom reward function (signature of ``reward.custom_reward_function``); ``answer_length`` comes
    from ``reward.custom_reward_function.reward_kwargs`` (the study passes its answer length)."""
    if data_source != DATA_SOURCE:
        raise ValueError(f"prefix_reward scores data_source {DATA_SOURCE!r}, got {data_source!r}")
    return prefix_decayed_score(solution_str.split(), ground_truth, answer_length)
