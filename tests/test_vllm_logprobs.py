"""Reading vLLM's completion logprobs into pdlb's (pure parsing; the real server is in test_vllm.py)."""

from __future__ import annotations

import pytest

from pdlb.engines.vllm.engine import logprobs_of


def test_each_token_gets_its_logprob_and_exactly_n_most_likely_first():
    """vLLM lists the drawn token beside the n most likely when it is not among them; pdlb keeps
    the n most likely, most likely first, as its own engine does."""
    choice = {
        "logprobs": {
            "tokens": ["token_id:7", "token_id:9"],
            "token_logprobs": [-0.5, -3.0],
            "top_logprobs": [
                {"token_id:7": -0.5, "token_id:3": -1.5},
                {"token_id:9": -3.0, "token_id:4": -0.1, "token_id:5": -0.9},  # 9 drawn, not among the top 2
            ],
        }
    }
    first, second = logprobs_of(choice, [7, 9], 2)
    assert (first.token, first.logprob, first.top) == (7, -0.5, [(7, -0.5), (3, -1.5)])
    assert (second.token, second.logprob, second.top) == (9, -3.0, [(4, -0.1), (5, -0.9)])
    assert logprobs_of(choice, [7, 9], None) == []  # none asked for
    zero = logprobs_of(choice, [7, 9], 0)
    assert [(s.logprob, s.top) for s in zero] == [(-0.5, []), (-3.0, [])]


def test_a_chunk_with_too_few_logprobs_or_text_tokens_is_refused():
    with pytest.raises(ValueError, match="1 logprobs for 2 tokens"):
        logprobs_of({"logprobs": {"token_logprobs": [-1.0], "top_logprobs": [{}]}}, [1, 2], 1)
    with pytest.raises(ValueError, match="token_id:<id>"):
        logprobs_of({"logprobs": {"token_logprobs": [-1.0], "top_logprobs": [{" Paris": -1.0}]}}, [1], 1)
