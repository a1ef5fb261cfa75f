"""The GSM8K reward (envs/gsm8k.py): the reference scorer strict and flexible, format_score, and
the reward.function hook, against hand-worked answers."""

import pytest

from configs.load import load_config
from envs import reward_fn
from envs.gsm8k import (
    compute_score,
    extract_solution,
    flexible_compute_score,
    gsm8k_format_reward,
    gsm8k_score,
    lenient_compute_score,
)
from envs.reward import import_reward_fn, score_samples

NOT_CALLABLE = 42


def builtin(*overrides, function=None, for_eval=False):
    """The run's reward (envs.reward_fn) of recipe tiny-cpu (GSM8K) with `overrides` and reward.function."""
    cfg = load_config("tiny-cpu", list(overrides))
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"function": function})})
    return reward_fn(cfg, for_eval=for_eval)


def fn(data_source, solution_str, ground_truth, extra_info):
    """Loaded by dotted path in the tests below."""
    return 0.5


def fails_on_bad(data_source, solution_str, ground_truth, extra_info):
    if "bad" in solution_str:
        raise KeyError("boom")
    return 1.0


PAD = "x" * 300  # pushes anything before it out of the 300-character window


@pytest.mark.parametrize(
    "text, method, expected",
    [
        ("so the answer is #### 72", "strict", "72"),
        ("#### 1,234", "strict", "1234"),
        ("#### -5", "strict", "-5"),
        ("#### 3.5", "strict", "3.5"),
        ("#### 72.", "strict", "72"),
        ("#### 1,234.50.", "strict", "1234.50"),
        ("first #### 1 then #### 2", "strict", "2"),
        ("#### 7\n#### 8\nfinal: #### 9", "strict", "9"),
        ("#### 72" + PAD, "strict", None),
        ("#### 72" + "a" * 293, "strict", "72"),  # "#### 72" is exactly the first 7 of the last 300
        ("#### 72" + "a" * 294, "strict", None),  # one '#' falls out of the window
        ("the answer is 72", "strict", None),
        ("#### $72", "strict", None),  # as in the reference, a currency sign breaks strict
        ("#### .", "strict", None),
        ("", "strict", None),
        ("3 apples and 5 pears, so 8.", "flexible", "8"),
        ("#### 72 but actually 73", "flexible", "73"),
        ("Total: 1,234.50 dollars", "flexible", "1234.50"),
        ("it is 42 ...", "flexible", "42"),
        ("it is 42, .", "flexible", "42"),
        ("lost -7 degrees", "flexible", "-7"),
        ("12" + PAD, "flexible", None),
        ("no idea", "flexible", None),
    ],
)
def test_extract_solution_lenient(text, method, expected):
    assert extract_solution(text, method, scorer="lenient") == expected


# The reference framework's GSM8K scorer, worked by hand from its two regexes: strict takes the
# last "#### " match and removes commas only; flexible takes the last match that is not a lone
# "." and keeps it as it is.
@pytest.mark.parametrize(
    "text, method, expected",
    [
        ("so the answer is #### 72", "strict", "72"),
        ("#### 1,234", "strict", "1234"),
        ("#### 72.", "strict", "72."),  # the sentence's period stays: "72." != "72"
        ("#### 72.0", "strict", "72.0"),
        ("#### 1,234.50.", "strict", "1234.50."),
        ("#### .", "strict", "."),  # an answer (a wrong one), not a missing one
        ("first #### 1 then #### 2", "strict", "2"),
        ("#### 72" + PAD, "strict", None),
        ("#### 72" + "a" * 293, "strict", "72"),
        ("####72", "strict", None),  # the space after #### is part of the pattern
        ("#### $72", "strict", None),
        ("3 apples and 5 pears, so 8.", "flexible", "8."),
        ("Total: 1,234.50 dollars", "flexible", "1,234.50"),  # flexible keeps commas
        ("it is 42, .", "flexible", "42,"),  # "." skipped, "42," kept whole
        ("lost -7 degrees", "flexible", "-7"),
        ("no idea", "flexible", None),
        (". .", "flexible", "."),
    ],
)
def test_extract_solution_reference(text, method, expected):
    assert extract_solution(text, method) == expected
    assert extract_solution(text, method, scorer="reference") == expected


def test_extract_solution_rejects_unknown_method_and_scorer():
    with pytest.raises(ValueError, match="flexible"):
        extract_solution("#### 1", "loose")
    with pytest.raises(ValueError, match="reference"):
        extract_solution("#### 1", "strict", scorer="exact")


@pytest.mark.parametrize(
    "response, truth, kwargs, expected",
    [
        ("#### 72", "72", {}, 1.0),
        ("#### 1,234", "1234", {}, 1.0),
        ("#### 1234", "1,234", {}, 1.0),  # ground truth normalised too
        ("#### 72.0", "72", {}, 1.0),  # numerically equal decimals match
        ("#### 72.50", "72.5", {}, 1.0),
        ("#### -3", "-3", {}, 1.0),
        ("#### 71", "72", {}, 0.0),
        ("#### 71", "72", {"format_score": 0.1}, 0.1),
        ("no number at all", "72", {"format_score": 0.1}, 0.0),
        ("the answer is 72", "72", {}, 0.0),  # strict needs ####
        ("the answer is 72", "72", {"method": "flexible"}, 1.0),
        ("#### 72", "72", {"score": 2.0}, 2.0),
        ("#### 72" + PAD, "72", {"format_score": 0.1}, 0.0),
    ],
)
def test_gsm8k_score_lenient(response, truth, kwargs, expected):
    assert gsm8k_score(response, truth, scorer="lenient", **kwargs) == expected


@pytest.mark.parametrize(
    "response, truth, kwargs, expected",
    [
        ("#### 72", "72", {}, 1.0),
        ("#### 1,234", "1234", {}, 1.0),  # commas of the answer go
        ("#### 1234", "1,234", {}, 0.0),  # the ground truth is taken as it is (prep removes commas)
        ("#### 72.0", "72", {}, 0.0),  # text compare, as the reference: published numbers count it wrong
        ("#### 72.", "72", {}, 0.0),
        ("#### 72.", "72", {"format_score": 0.1}, 0.1),
        ("#### .", "72", {"format_score": 0.1}, 0.1),
        ("#### 71", "72", {}, 0.0),
        ("the answer is 72", "72", {"method": "flexible"}, 1.0),
        ("the answer is 72.", "72", {"method": "flexible"}, 0.0),
        ("the answer is 1,234", "1234", {"method": "flexible"}, 0.0),  # flexible keeps the comma
        ("#### 72", "72", {"score": 2.0}, 2.0),
    ],
)
def test_gsm8k_score_reference(response, truth, kwargs, expected):
    assert gsm8k_score(response, truth, **kwargs) == expected


# Issue 13 (3): a response cut by max_tokens right after "#### 10" (it was writing "#### 100").
@pytest.mark.parametrize("scorer", ["reference", "lenient"])
@pytest.mark.parametrize("method", ["strict", "flexible"])
def test_an_answer_ending_at_the_cut_is_not_trusted(scorer, method):
    cut = "so 60 + 40 = 100 and the answer is #### 10"
    assert gsm8k_score(cut, "10", method, scorer=scorer) == 1.0  # finished there: trusted
    assert gsm8k_score(cut, "10", method, scorer=scorer, truncated=True) == 0.0
    # cut later: the number was finished (a newline or a word came after it)
    assert gsm8k_score("#### 10\n", "10", method, scorer=scorer, truncated=True) == 1.0
    assert gsm8k_score("#### 10 and then", "10", "strict", scorer=scorer, truncated=True) == 1.0
    # through the reward hook: finish_reason comes with extra_info
    fn = builtin(f"reward.gsm8k_scorer={scorer}")
    assert fn("openai/gsm8k", "#### 10", "10", {"index": 3, "finish_reason": "length"}) == 0.0
    assert fn("openai/gsm8k", "#### 10", "10", {"index": 3, "finish_reason": "stop"}) == 1.0
    assert fn("openai/gsm8k", "#### 10", "10", None) == 1.0


def test_compute_score_is_the_reference_scorer():
    assert compute_score("openai/gsm8k", "#### 18", "18") == 1.0
    assert compute_score("openai/gsm8k", "#### 17", "18", {"split": "test"}) == 0.0


def test_compute_score_of_another_source_names_it_and_the_fix():
    with pytest.raises(ValueError, match=r"'my/dataset'.*reward\.function"):
        compute_score("my/dataset", "#### 1", "1")


@pytest.mark.parametrize("dotted", [None, "", "  "])
def test_an_unset_reward_function_is_the_envs_builtin(dotted):
    assert builtin(function=dotted) is compute_score
    assert builtin("reward.gsm8k_scorer=lenient", function=dotted) is lenient_compute_score
    assert builtin("reward.gsm8k_scorer=lenient", function=dotted, for_eval=True) is compute_score
    assert lenient_compute_score("openai/gsm8k", "#### 72.0", "72") == 1.0
    assert compute_score("openai/gsm8k", "#### 72.0", "72") == 0.0
    with pytest.raises(ValueError, match="reward.gsm8k_scorer"):
        load_config("tiny-cpu", ["reward.gsm8k_scorer=exact"])


@pytest.mark.parametrize("dotted", ["tests.test_reward:fn", "tests.test_reward.fn"])
def test_import_reward_fn_dotted_path(dotted):
    loaded = import_reward_fn(dotted)
    assert loaded is fn and builtin(function=dotted) is fn and builtin(function=dotted, for_eval=True) is fn
    assert loaded("openai/gsm8k", "#### 1", "1", None) == 0.5


def two_args(solution_str, ground_truth):
    """A reward of the wrong signature (loaded by dotted path below)."""
    return 0.0


def keywords_only(*, data_source, solution_str, ground_truth, extra_info):
    return 0.0


def any_args(*args, **kwargs):
    return 0.0


@pytest.mark.parametrize("name", ["two_args", "keywords_only"])
def test_reward_fn_of_the_wrong_signature_is_refused_at_load(name):
    """A fresh clone's review: a reward that cannot take the four arguments failed at the first
    reward stage; import_reward_fn (preflight) refuses it in one line naming the path and the signature."""
    dotted = f"tests.test_reward:{name}"
    with pytest.raises(ValueError) as e:
        import_reward_fn(dotted)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"reward function {dotted!r}: tests.test_reward.{name}(")
    assert "cannot be called as fn(data_source, solution_str, ground_truth, extra_info) -> float" in msg
    assert import_reward_fn("tests.test_reward:any_args") is any_args  # *args takes them


@pytest.mark.parametrize(
    "dotted, problem",
    [
        ("tests.no_such_module:fn", r"module 'tests\.no_such_module' not found"),
        ("no_such_package.rewards.fn", r"module 'no_such_package\.rewards' not found"),
        ("tests.test_reward:missing", r"has no attribute 'missing'"),
        ("tests.test_reward:NOT_CALLABLE", r"not callable"),
        ("justaname", r"not a dotted path"),
        ("tests.test_reward:", r"not a dotted path"),
    ],
)
def test_import_reward_fn_bad_path(dotted, problem):
    with pytest.raises(ValueError, match=problem) as info:
        import_reward_fn(dotted)
    assert repr(dotted) in str(info.value)


def test_score_samples_all_good():
    scores, n_errors = score_samples(
        compute_score,
        ["openai/gsm8k"] * 3,
        ["#### 1", "#### 2", "nothing"],
        ["1", "3", "1"],
        [{"index": i} for i in range(3)],
    )
    assert scores == [1.0, 0.0, 0.0]
    assert n_errors == 0


def test_score_samples_raise_names_index_source_and_response_prefix():
    long_bad = "bad " + "y" * 200
    with pytest.raises(RuntimeError) as info:
        score_samples(fails_on_bad, ["a", "b"], ["fine", long_bad], ["1", "1"], [None, None], on_error="raise")
    message = str(info.value)
    assert "sample 1" in message
    assert "'b'" in message
    assert repr(long_bad[:80]) in message
    assert long_bad[:81] not in message
    assert isinstance(info.value.__cause__, KeyError)


def test_score_samples_zero_counts_errors():
    scores, n_errors = score_samples(
        fails_on_bad, ["a"] * 4, ["fine", "bad", "fine", "bad again"], ["1"] * 4, None, on_error="zero"
    )
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert n_errors == 2


def test_score_samples_rejects_mismatched_lengths_and_bad_mode():
    with pytest.raises(ValueError, match="different lengths"):
        score_samples(fn, ["a"], ["x", "y"], ["1", "2"], None)
    with pytest.raises(ValueError, match="on_error"):
        score_samples(fn, ["a"], ["x"], ["1"], None, on_error="ignore")


def returns(value):
    return lambda data_source, solution_str, ground_truth, extra_info: value


# Issue 13 (2): a non-finite reward must never reach the advantages.
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_is_a_reward_error(bad):
    assert score_samples(returns(bad), ["a"], ["r"], ["1"], None, on_error="zero") == ([0.0], 1)
    with pytest.raises(RuntimeError, match=r"sample 0 .*not a finite number"):
        score_samples(returns(bad), ["a"], ["r"], ["1"], None, on_error="raise")


def test_non_finite_reward_gives_finite_advantages():
    import torch

    from engines.algos import grpo_advantages

    fn = lambda ds, s, gt, extra: float(s)  # noqa: E731
    scores, errors = score_samples(fn, ["a"] * 3, ["nan", "1", "0"], ["1"] * 3, None, on_error="zero")
    assert (scores, errors) == ([0.0, 1.0, 0.0], 1)
    adv = grpo_advantages(torch.tensor(scores), [0, 0, 0])
    # group [0, 1, 0]: mean 1/3, unbiased std sqrt(1/3); (r - mean) / (std + 1e-6)
    std = (1 / 3) ** 0.5
    assert torch.allclose(adv, torch.tensor([-1 / 3, 2 / 3, -1 / 3]) / (std + 1e-6))


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so 2+3=5\n#### 5", 1.0),  # right: the reference scorer's 1.0
        ("so 2+3=6\n#### 6", 0.5),  # the format, a wrong number
        ("ab 12 #x", 0.5 * 3 / 6),  # no answer: '1', '2', '#' are 3 of the 6 characters
        ("no digits here", 0.0),
        ("", 0.0),
    ],
)
def test_gsm8k_format_reward_gives_partial_credit_for_the_format(response, expected):
    assert gsm8k_format_reward("openai/gsm8k", response, "5", {"finish_reason": "stop"}) == pytest.approx(expected)


def test_gsm8k_format_reward_keeps_the_cut_rule():
    # "#### 5" ending at a max_tokens cut may be "#### 50": not credited as right, still the format.
    assert gsm8k_format_reward("openai/gsm8k", "#### 5", "5", {"finish_reason": "length"}) == 0.5


def test_format_score_rewards_a_wellformed_wrong_answer_only():
    """reward.format_score (the reference scorer's argument): 1 right, format_score for a wrong
    `#### N`, 0 without one; the cut rule still gives 0."""
    fn = builtin("reward.format_score=0.1")
    assert fn("openai/gsm8k", "so #### 18", "18", None) == 1.0
    assert fn("openai/gsm8k", "so #### 17", "18", None) == 0.1
    assert fn("openai/gsm8k", "the answer is 18", "18", None) == 0.0
    assert fn("openai/gsm8k", "so #### 17", "18", {"finish_reason": "length"}) == 0.0
    assert (
        builtin("reward.gsm8k_scorer=lenient", "reward.format_score=0.1")("openai/gsm8k", "#### 18.0", "18", None)
        == 1.0
    )
    assert builtin("reward.format_score=0.0") is compute_score
    assert builtin("reward.format_score=0.1", for_eval=True) is compute_score  # the eval is an accuracy
    with pytest.raises(ValueError, match=r"reward\.format_score"):
        load_config("tiny-cpu", ["reward.format_score=1.0"])
    with pytest.raises(ValueError, match=r"reward\.format_score=0\.1 applies to the built-in"):
        load_config("tiny-cpu", ["reward.format_score=0.1", "reward.function=tests.test_reward:fn"])


def test_flexible_compute_score_needs_no_format():
    assert flexible_compute_score("openai/gsm8k", "so the answer is 18.", "18") == 0.0  # "18." as text
    assert flexible_compute_score("openai/gsm8k", "so the answer is 18", "18") == 1.0
    assert flexible_compute_score("openai/gsm8k", "#### 18", "18") == 1.0
    assert compute_score("openai/gsm8k", "so the answer is 18", "18") == 0.0
