"""benchmarks/bench_vllm_topk.py without an engine: its arguments and the held-memory measure it reports."""

import numpy as np
import pytest

from benchmarks import bench_vllm_topk as bench


def test_arguments_choose_the_shape():
    args = bench.parse_args(["--vocab", "8192,151936", "--tokens", "1024,4096", "--prompts", "4"])
    assert (args.vocab, args.tokens, args.prompts, args.k, args.before) == (
        [8192, 151936],
        [1024, 4096],
        4,
        [0, 4, 20],
        False,
    )
    for bad in (["--k", "21"], ["--vocab", "x"], ["--prompts", "0"], ["--tokens", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(bad)
        assert exit_info.value.code == 2, bad


def test_deep_size_counts_each_object_once():
    import sys as _sys

    text = "a token"
    value = 1.5
    rows = [{7: value, 8: text}, {7: value}]  # value and text shared: counted once
    expected = (
        _sys.getsizeof(rows)
        + _sys.getsizeof(rows[0])
        + _sys.getsizeof(rows[1])
        + _sys.getsizeof(7)
        + _sys.getsizeof(8)
        + _sys.getsizeof(value)
        + _sys.getsizeof(text)
    )
    assert bench.deep_size(rows) == expected
    block = np.zeros((256, 21), dtype=np.int32)
    view = block[:10]
    assert _sys.getsizeof(block) >= block.nbytes > _sys.getsizeof(view)  # numpy counts an owned buffer in getsizeof
    size = bench.deep_size([view])  # the view keeps the whole block alive: its buffer is counted once
    assert size == _sys.getsizeof([view]) + _sys.getsizeof(view) + _sys.getsizeof(block)
    assert block.nbytes < size < block.nbytes + 400
