"""``logit_bias`` (OpenAI's): a per-row logits processor in the engine's step. On a random
model only the bias can make these outputs what they are."""

from __future__ import annotations

import pytest

from fermi.errors import RequestError
from tests.test_scheduler_overlap import eager, overlapped
from tests.tiny import write_checkpoint

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bias") / "qwen3", {}, seed=4)


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_strong_bias_picks_the_token_every_step_even_the_first(folder, make):
    with make(folder) as engine:
        out = engine.generate(
            prompt_token_ids=PROMPT, max_tokens=12, temperature=0, ignore_eos=True,
            logit_bias={"42": 100},
        )  # fmt: skip
        assert out.token_ids == [42] * 12


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_sampled_tokens_stay_within_the_tokens_not_banned(folder, make):
    allowed = {11, 12, 13}
    with make(folder) as engine:
        vocab = engine.capabilities.vocab_size
        banned = {t: -100 for t in range(vocab) if t not in allowed}
        out = engine.generate(
            prompt_token_ids=PROMPT, max_tokens=40, temperature=1.0, seed=3, ignore_eos=True,
            logit_bias=banned,
        )  # fmt: skip
        assert set(out.token_ids) <= allowed
        assert len(set(out.token_ids)) > 1  # sampled, not forced


def test_a_biased_request_beside_others_leaves_them_unchanged(folder):
    """The processor applies to its own row: a neighbour decodes as it does alone."""
    with overlapped(folder) as engine:
        plain = {"prompt_token_ids": [9, 10, 11], "max_tokens": 30, "ignore_eos": True, "seed": 1}
        alone = engine.generate(**plain).token_ids
        biased = engine.stream(
            prompt_token_ids=PROMPT, max_tokens=280, ignore_eos=True, logit_bias={"42": 100}
        )
        first = next(biased)
        beside = engine.generate(**plain).token_ids
        ran_beside = engine.stats().running == 1  # the biased stream had not ended
        biased.close()
        assert first.token_ids == [42]
        assert ran_beside
        assert beside == alone


def test_logit_bias_with_logprobs_reports_the_biased_distribution(folder):
    with eager(folder) as engine:
        out = engine.generate(
            prompt_token_ids=PROMPT, max_tokens=3, temperature=0, ignore_eos=True,
            logit_bias={42: 100}, logprobs=1,
        )  # fmt: skip
        assert [lp.top[0].token_id for lp in out.logprobs] == [42, 42, 42]
        assert all(lp.logprob > -1e-3 for lp in out.logprobs)


@pytest.mark.parametrize(
    ("bias", "code"),
    [
        ({"100000": 5}, "invalid_value"),  # outside the vocabulary
        ({"3": 101}, "invalid_value"),
        ({"3": float("nan")}, "invalid_value"),
        ({"three": 1}, "invalid_type"),
        ({"3": "high"}, "invalid_type"),
        ([3, 4], "invalid_type"),
    ],
)
def test_a_malformed_logit_bias_is_a_request_error_naming_it(folder, bias, code):
    with eager(folder) as engine:
        with pytest.raises(RequestError) as err:
            engine.build_request(prompt_token_ids=PROMPT, logit_bias=bias)
        assert err.value.param == "logit_bias" and err.value.code == code
