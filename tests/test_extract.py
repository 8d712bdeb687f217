"""a2r.extract: answer components, final-answer extraction, math normalisation, majority vote."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a2r.extract import (
    answer_key,
    answers_equal,
    extract_answer_component,
    extract_boxed,
    extract_final_answer,
    extract_last_number,
    majority_vote,
    normalize_answer,
    parse_number,
)

# ------------------------------------------------------------------ \boxed{...}


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"nested \boxed{\left(1, \frac{a}{b^{2}}\right)} done", r"\left(1, \frac{a}{b^{2}}\right)"),
    (r"escaped braces \boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"first \boxed{1} then \boxed{2}", "2"),                # the last box wins
    (r"\boxed{3} and an unclosed \boxed{4", "3"),             # unclosed last box is skipped
    (r"space form \boxed 7.", "7"),
    (r"\fbox{9}", "9"),
    (r"\boxed {5}", "5"),
    ("no box here", None),
    (r"\boxed{", None),
    (r"\boxedx{1}", None),                                  # another command, not \boxed
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"<think>maybe 3</think> The answer is \boxed{84}.", "84"),
    (r"<think>I get \boxed{5}</think> so 5 it is, 6 nope", "6"),  # after </think>: last number
    (r"<think>I get \boxed{5}</think> no numbers after", "5"),    # falls back to the whole text
    ("The total is 1,234.50 dollars.", "1,234.50"),
    ("It takes 3/4 of an hour.", "3/4"),
    ("temperature drops to -.5 then", "-.5"),
    ("x2 and y3 are names, not numbers", None),
    ("no answer at all", None),
    ("", None),
    (r"\boxed{} but 7 later", "7"),                            # an empty box is no answer
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_last_number_ignores_words_with_digits():
    assert extract_last_number("v1 costs 12 and v2 costs 15.") == "15"
    assert extract_last_number("version 3.11 ") == "3.11"


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw, expected", [
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    ("1/2", r"\frac{1}{2}"),
    ("-1/2", r"\frac{-1}{2}"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\frac{1}2", r"\frac{1}{2}"),
    ("0.50", "0.5"),
    ("5.0", "5"),
    ("10.0100", "10.01"),
    (".5", "0.5"),
    ("12.", "12"),
    ("12...", "12"),
    ("-0", "0"),
    ("1,000", "1000"),
    ("1,234,567.80", "1234567.8"),
    (r"1{,}000", "1000"),
    ("(1,2)", "(1,2)"),                                      # a tuple keeps its comma
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"5\text{ cm}", "5"),
    (r"5 \mbox{ meters}", "5"),
    (r"\text{(A)}", "(A)"),
    ("12 apples", "12"),
    ("7 cm^2", "7"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"50\%", "50"),
    (r"\$5.00", "5"),
    ("$x^2$", "x^2"),
    ("x = 5", "5"),
    ("f(x) = 3", "3"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\boxed{7}", "7"),
    (r"\displaystyle \frac{1}{3}", r"\frac{1}{3}"),
    (r"3\,000", "3000"),
    ("  x + 1  ", "x+1"),
    (None, None),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, value", [
    ("42", Fraction(42)),
    ("-3", Fraction(-3)),
    ("0.25", Fraction(1, 4)),
    (r"\frac{3}{4}", Fraction(3, 4)),
    (r"-\frac{3}{4}", Fraction(-3, 4)),
    ("6/4", Fraction(3, 2)),
    (r"\frac{1}{0}", None),                                  # division by zero is no number
    ("x+1", None),
    ("", None),
])
def test_parse_number(raw, value):
    assert parse_number(raw) == value


@pytest.mark.parametrize("a, b", [
    ("0.5", r"\frac{1}{2}"), ("1/2", r"\dfrac{1}{2}"), ("0.50", ".5"), ("1,000", "1000"),
    (r"\boxed{84}", "84"), ("84.", "84"), (r"5 \text{cm}", "5"), ("6/4", "1.5"),
    (r"\left(1,2\right)", "(1, 2)"), ("x = 3", "3"), (r"\frac{-1}{2}", "-0.5"),
])
def test_answers_equal(a, b):
    assert answers_equal(a, b)
    assert answers_equal(b, a)


@pytest.mark.parametrize("a, b", [
    ("0.5", "0.51"), ("1/2", "1/3"), ("(1,2)", "(2,1)"), ("12", "-12"), (None, None),
    ("", ""), (None, "1"), ("0.333", "1/3"),
])
def test_answers_not_equal(a, b):
    assert not answers_equal(a, b)


def _formats_of(numerator: int, denominator: int) -> list[str]:
    """Ways people write the rational numerator / denominator (denominator > 0)."""
    value = Fraction(numerator, denominator)
    forms = [f"{numerator}/{denominator}", rf"\frac{{{numerator}}}{{{denominator}}}",
             rf"\dfrac{{{numerator}}}{{{denominator}}}"]
    if value.denominator in (1, 2, 4, 5, 8, 10, 20, 25, 50, 100):   # finite decimals
        decimal = f"{float(value):.6f}"                            # trailing zeros on purpose
        forms += [decimal, decimal + ".", f"\\boxed{{{decimal}}}", f"{decimal} \\text{{ cm}}"]
    if value.denominator == 1:
        forms += [f"{value.numerator:,}", f"{value.numerator}^\\circ"]
    return forms


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(-10**6, 10**6), st.integers(1, 200))
def test_all_formats_of_a_number_agree(numerator, denominator):
    forms = _formats_of(numerator, denominator)
    keys = {answer_key(f) for f in forms}
    assert keys == {f"#{Fraction(numerator, denominator).numerator}/"
                    f"{Fraction(numerator, denominator).denominator}"}, forms


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.text(alphabet="0123456789.,/-+x=()\\{}fracbox $%", max_size=20))
def test_normalize_is_idempotent_on_math_like_text(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


# ------------------------------------------------------------------ majority vote


@pytest.mark.parametrize("answers, expected", [
    (["3", "4", "3"], ("3", 2)),
    (["4", "3", "3", "4"], ("4", 2)),                          # tie: earliest first occurrence
    (["3", "4", "4", "3"], ("3", 2)),
    (["1/2", "7", "0.5", "7"], ("1/2", 2)),                    # tie between value groups
    (["7", "0.5", r"\frac{1}{2}"], ("0.5", 2)),                # 0.5 == \frac{1}{2}: one group
    ([None, "", "5"], ("5", 1)),                               # no-answers do not vote
    ([None, None], (None, 0)),
    ([], (None, 0)),
    (["a", "b", "c"], ("a", 1)),
])
def test_majority_vote(answers, expected):
    assert majority_vote(answers) == expected


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["1", "2", "3", "0.5", "1/2", None]), max_size=12))
def test_majority_vote_properties(answers):
    winner, votes = majority_vote(answers)
    counts: dict = {}
    for a in answers:
        if answer_key(a) is not None:
            counts[answer_key(a)] = counts.get(answer_key(a), 0) + 1
    if not counts:
        assert (winner, votes) == (None, 0)
        return
    assert votes == max(counts.values()) == counts[answer_key(winner)]
    # The winner's group appears no later than any other group with as many votes.
    first = {}
    for i, a in enumerate(answers):
        first.setdefault(answer_key(a), i)
    tied = [k for k, c in counts.items() if c == votes]
    assert first[answer_key(winner)] == min(first[k] for k in tied)
    assert winner == answers[first[answer_key(winner)]]         # returned as first written


# ------------------------------------------------------------------ answer components


def test_component_after_last_think_end():
    text = "<think>a</think> draft <think>b</think>  Final: \\boxed{3}  "
    assert extract_answer_component(text) == "Final: \\boxed{3}"
    assert extract_answer_component(text, mode="after_think") == "Final: \\boxed{3}"


def test_component_without_think_end_takes_the_tail():
    text = " ".join(f"w{i}" for i in range(200))               # 200 words, 1089 characters
    tail = extract_answer_component(text, tail_chars=50)
    assert text.endswith(tail) and len(tail) <= 50
    assert tail.split()[0] in text.split()                     # starts at a whole word
    assert extract_answer_component(text, mode="after_think") == ""
    assert extract_answer_component("short answer 5", tail_chars=50) == "short answer 5"


def test_component_modes_full_and_tail_ignore_think_end():
    text = "reasoning</think>answer"
    assert extract_answer_component(text, mode="full") == text
    assert extract_answer_component(text, mode="tail", tail_chars=10) == text[-10:]


def test_component_caps_keep_the_end():
    text = "</think>" + "x" * 30 + " the answer is \\boxed{12}"
    capped = extract_answer_component(text, max_chars=20)
    assert len(capped) <= 20 and capped.endswith("\\boxed{12}")
    assert extract_answer_component(text, max_chars=None) == text[len("</think>"):].strip()
    assert extract_answer_component(text, max_chars=0) == ""


class _CharTokenizer:
    """One token per character: enough to check the token cap."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_component_token_cap():
    text = "</think>abcdefghij"
    assert extract_answer_component(text, max_tokens=4, tokenizer=_CharTokenizer()) == "ghij"
    assert extract_answer_component(text, max_tokens=0, tokenizer=_CharTokenizer()) == ""
    assert extract_answer_component(text, max_tokens=99, tokenizer=_CharTokenizer()) == "abcdefghij"


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "middle"}, "mode"),
    ({"max_chars": -1}, "max_chars"),
    ({"max_tokens": 5}, "tokenizer"),
])
def test_component_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_answer_component("text", **kwargs)
