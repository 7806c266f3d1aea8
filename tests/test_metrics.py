"""core.metrics against hand computations, user functions by import path and their errors, eval.metric config.

.venv/bin/python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import pytest

from core.config import ConfigError, EvalConfig, load_config
from core.metrics import (
    BUILTIN,
    MetricError,
    contains,
    exact_match,
    lcs_length,
    normalize_answer,
    normalized_match,
    regex_match,
    resolve_user_metric,
    rouge_l,
    score,
)

NOT_A_FUNCTION = 0.5


# User functions, referenced below as tests.test_metrics:<name>.
def first_word(prediction: str, reference: str) -> float:
    return float(prediction.split()[:1] == reference.split()[:1])


def as_bool(prediction: str, reference: str) -> bool:
    return len(prediction) == len(reference)


def out_of_range(prediction: str, reference: str) -> float:
    return 2.0


def a_string(prediction: str, reference: str) -> str:
    return "yes"


def a_nan(prediction: str, reference: str) -> float:
    return float("nan")


def raises_on_b(prediction: str, reference: str) -> float:
    if prediction == "b":
        raise KeyError("no score for b")
    return 1.0


def cfg(**kw) -> EvalConfig:
    return EvalConfig(**kw)


# --- built-ins ------------------------------------------------------------------------------------


def test_exact_match_collapses_whitespace_only():
    assert exact_match("  a \n b\t", "a b") == 1.0
    assert exact_match("A b", "a b") == 0.0  # case counts
    assert exact_match("a b.", "a b") == 0.0  # punctuation counts


def test_normalize_answer_lower_cases_deletes_punctuation_and_collapses_whitespace():
    assert normalize_answer("  The  Answer!\n") == "the answer"
    assert normalize_answer("don't, $5¿") == "dont 5"  # deleted, not replaced by a space (SQuAD)
    assert normalize_answer("the a an") == "the a an"  # articles are kept
    assert normalized_match("Paris.", " paris") == 1.0
    assert normalized_match("Paris", "Lyon") == 0.0


def test_contains_checks_the_normalised_reference_is_a_substring():
    assert contains("I think it is Paris, France.", "paris") == 1.0
    assert contains("I think it is Paris, France.", "Lyon") == 0.0
    assert contains("parisian", "paris") == 1.0  # a substring, not a word match
    # '' is a substring of everything: an empty reference is met only by an empty answer.
    assert contains("anything", " . ") == 0.0 and contains("!", "") == 1.0


def test_regex_takes_group_1_or_the_whole_first_match():
    import re

    grouped = re.compile(r"answer: *(\w+)")
    assert regex_match("so the answer: Paris.", "paris", pattern=grouped) == 1.0  # group 1 = 'Paris'
    assert regex_match("so the answer: Lyon", "paris", pattern=grouped) == 0.0
    assert regex_match("Paris", "paris", pattern=grouped) == 0.0  # no match scores 0
    whole = re.compile(r"\d+")
    assert regex_match("it is 42 or 43", "42", pattern=whole) == 1.0  # the first match, whole
    assert regex_match("it is 42 or 43", "43", pattern=whole) == 0.0
    optional = re.compile(r"x(y)?")
    assert regex_match("x", "x", pattern=optional) == 0.0  # group 1 took no part: no answer


def test_lcs_length_of_known_sequences():
    # CLRS 15.4's example: LCS(ABCBDAB, BDCABA) = 4 (e.g. BCBA).
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0 and lcs_length(["a"], ["a"]) == 1


def test_rouge_l_f1_by_hand():
    # pred a b c d e (5 tokens), ref b d f (3): LCS = b d = 2; P = 2/5, R = 2/3, F1 = 2PR/(P+R) = 0.5.
    assert rouge_l("a b c d e", "b d f") == pytest.approx(0.5)
    # Order matters (a subsequence, not a bag): LCS(b a, a b) = 1; P = R = 1/2, F1 = 0.5.
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    # pred the cat sat on the mat, ref the cat lay on a mat: LCS = the cat on mat = 4, P = R = 4/6.
    assert rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert rouge_l("The Cat, sat.", "the cat sat") == 1.0  # normalised first
    assert rouge_l("", "a") == 0.0 and rouge_l("x y", "a") == 0.0


def test_score_dispatches_every_builtin():
    preds, refs = ["Paris.", "the answer: 42", "b d"], ["paris", "42", "a b c d"]
    got = {name: score(name, preds, refs, cfg(metric=name, regex=r"answer: (\d+)")) for name in BUILTIN}
    assert got["exact_match"] == [0.0, 0.0, 0.0]
    assert got["normalized_match"] == [1.0, 0.0, 0.0]
    assert got["contains"] == [1.0, 1.0, 0.0]
    assert got["regex"] == [0.0, 1.0, 0.0]
    # F1 = 2·LCS / (|pred| + |ref|). Row 1: 'the answer 42' vs '42': LCS 1, 2/(3+1). Row 2: 'b d' vs
    # 'a b c d': LCS 2, 4/(2+4).
    assert got["rouge_l"] == pytest.approx([1.0, 1 / 2, 2 / 3])
    assert score("rouge_l", [], [], cfg()) == []


# --- user functions -------------------------------------------------------------------------------


def test_user_function_by_import_path():
    assert resolve_user_metric("tests.test_metrics:first_word") is first_word
    preds, refs = ["cat sat", "dog", ""], ["cat lay", "cat", "x"]
    assert score("tests.test_metrics:first_word", preds, refs, cfg()) == [1.0, 0.0, 0.0]
    assert score("tests.test_metrics:as_bool", ["ab", "a"], ["xy", "xy"], cfg()) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("metric", "match"),
    [
        ("tests.no_such_module:fn", "no module 'tests.no_such_module' can be imported"),
        ("nosuchpkg_h9.metrics:fn", "no module 'nosuchpkg_h9.metrics' can be imported"),
        ("tests.test_metrics:nope", "module 'tests.test_metrics' has no attribute 'nope'"),
        ("tests.test_metrics:NOT_A_FUNCTION", "tests.test_metrics.NOT_A_FUNCTION is a float, not a function"),
    ],
)
def test_user_function_that_does_not_resolve_is_a_clear_error(metric, match):
    with pytest.raises(MetricError, match=match) as err:
        score(metric, ["a"], ["a"], cfg())
    assert f"eval.metric {metric!r}" in str(err.value) and not err.value.retryable


def test_user_function_that_raises_names_the_row_and_the_function():
    with pytest.raises(MetricError) as err:
        score("tests.test_metrics:raises_on_b", ["a", "b"], ["a", "b"], cfg())
    msg = str(err.value)
    assert "'tests.test_metrics:raises_on_b' raised on eval row 1" in msg and "no score for b" in msg
    assert isinstance(err.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("fn", "shown"), [("out_of_range", "2.0 (float)"), ("a_string", "'yes' (str)"), ("a_nan", "nan (float)")]
)
def test_user_function_must_return_a_score_in_0_1_or_a_bool(fn, shown):
    with pytest.raises(MetricError, match=r"must return a float in \[0, 1\] or a bool") as err:
        score(f"tests.test_metrics:{fn}", ["a"], ["a"], cfg())
    assert f"'tests.test_metrics:{fn}' returned {shown}" in str(err.value) and "(eval row 0)" in str(
        err.value
    )


# --- config ---------------------------------------------------------------------------------------


def test_config_accepts_builtins_and_module_function_without_importing_it():
    for name in BUILTIN:
        extra = ["eval.regex=(\\d+)"] if name == "regex" else []
        assert load_config(overrides=[f"eval.metric={name}", *extra]).eval.metric == name
    # The import happens when eval runs, not whenever a config loads (show-config, promote, ...).
    assert (
        load_config(overrides=["eval.metric=nosuchpkg_h9.metrics:fn"]).eval.metric
        == "nosuchpkg_h9.metrics:fn"
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["eval.metric=bleu"],
            "eval.metric: is not a metric: use one of exact_match, normalized_match, contains, regex, rouge_l, "
            "or a function of yours as module:function",
        ),
        (["eval.metric=my-pkg:fn"], "eval.metric: is not a metric"),  # not a module name
        (["eval.metric=regex"], "eval.metric is regex but eval.regex is not set; set eval.regex"),
        (["eval.regex=(a"], "eval.regex: is not a valid Python regular expression"),
        (["eval.stop=[x, '']"], "eval.stop: has an empty string"),
        (
            ["data.format=text", "eval.metric=rouge_l"],
            "eval.metric is 'rouge_l' but data.format 'text' has no prompts or references: generation is "
            "skipped for text",
        ),
        (
            ["data.format=text", "promote.gates.no_regression.metric=task_metric"],
            "no_regression.metric is task_metric, which data.format 'text' does not produce",
        ),
    ],
)
def test_config_refuses_metrics_it_cannot_run(overrides, match):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert match in str(err.value)


def test_text_format_keeps_the_default_metric_and_may_turn_eval_off():
    assert load_config(overrides=["data.format=text"]).eval.metric == "exact_match"
    load_config(overrides=["data.format=text", "eval.metric=exact_match"])  # the default, spelled out
    load_config(overrides=["data.format=text", "eval.metric=rouge_l", "eval.enabled=false"])


def test_preflight_imports_the_user_metric_before_anything_trains():
    from core.preflight import preflight

    # Raised before the model is even looked at: the default builtin:tiny-llama need not exist here.
    with pytest.raises(MetricError, match="no module 'tests.no_such_module' can be imported"):
        preflight(load_config(overrides=["eval.metric=tests.no_such_module:fn"]))
