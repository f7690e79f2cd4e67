"""The worker's fitted line of step time against prefill tokens (what it reports as its prefill
speed and step base)."""

from __future__ import annotations

import random

from pdlb.engines.torch.step_fit import StepFit


def test_fit_recovers_base_and_rate_whatever_the_prompt_sizes():
    rng = random.Random(3)
    fit = StepFit()
    for _ in range(200):  # steps of 0..1024 prefill tokens, 4 ms fixed + 20 us a token, 2% noise
        tokens = rng.choice([0, 0, 0, rng.randrange(1, 1025)])
        fit.add(tokens, (0.004 + 0.00002 * tokens) * rng.uniform(0.98, 1.02))
    base, per_token = fit.line()
    assert abs(base - 0.004) < 0.0003 and abs(per_token - 0.00002) < 0.000002
    # the plain average of tokens / seconds over prefill steps depends on the prompt sizes: long
    # prompts look ~4x "faster" than short ones; the fitted slope does not
    short, long = 64 / (0.004 + 0.00002 * 64), 1024 / (0.004 + 0.00002 * 1024)
    assert long / short > 3


def test_no_line_until_step_sizes_differ_and_old_steps_fade():
    fit = StepFit()
    for _ in range(10):
        fit.add(0, 0.01)  # decode-only steps: no slope to fit
    assert fit.line() is None
    for tokens in (100, 200, 300) * 10:
        fit.add(tokens, 0.01 + 0.0001 * tokens)
    base, per_token = fit.line()
    assert abs(per_token - 0.0001) < 1e-9 and abs(base - 0.01) < 1e-6
    for tokens in (100, 200, 300) * 60:  # the worker got 4x slower per token: the fit follows
        fit.add(tokens, 0.01 + 0.0004 * tokens)
    assert abs(fit.line()[1] - 0.0004) < 0.00002
