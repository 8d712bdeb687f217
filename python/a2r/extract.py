"""Text handling around the A2R loop: answer components, final answers, math normalisation, votes.

Three jobs, all pure Python (no torch), so they are cheap to test exhaustively:

* :func:`extract_answer_component` — what an explorer path hands to the synthesizer: the text after
  the last ``</think>`` when the model wrote one, else the final part of the text; capped in
  characters and/or tokens. The cap keeps the *end*, where the conclusion and the boxed answer are.
* :func:`extract_final_answer` — the answer a grader compares: the last ``\\boxed{...}`` (nested
  braces handled), else the last number in the text, else ``None``.
* :func:`normalize_answer`, :func:`answers_equal`, :func:`majority_vote` — grading. Normalisation
  follows the usual MATH / Minerva conventions (``\\left``/``\\right``, ``\\dfrac``, ``\\text{units}``,
  thousands commas, ``0.50`` vs ``0.5``, ``1/2`` vs ``\\frac{1}{2}``, trailing periods, ...); equality
  additionally compares exact rational values, so ``0.5 == \\frac{1}{2} == 1/2``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Iterable, Sequence

__all__ = [
    "THINK_END",
    "answer_key",
    "answers_equal",
    "extract_answer_component",
    "extract_boxed",
    "extract_final_answer",
    "extract_last_number",
    "majority_vote",
    "normalize_answer",
    "parse_number",
]

THINK_END = "</think>"
ANSWER_MODES = ("auto", "after_think", "tail", "full")

# --------------------------------------------------------------------------------------------
# Answer component (explorer path -> reference for the synthesizer)
# --------------------------------------------------------------------------------------------


def extract_answer_component(text: str, *, mode: str = "auto", max_chars: int | None = 1024,
                             max_tokens: int | None = None, tokenizer=None,
                             think_end: str = THINK_END, tail_chars: int = 512) -> str:
    """The part of an explorer's output that the synthesizer sees as a reference.

    ``mode``:
      * ``"auto"`` — the text after the last ``think_end`` when present, else the last
        ``tail_chars`` characters (an unfinished or think-less path has no separate answer; its end
        is the closest thing to a conclusion).
      * ``"after_think"`` — the text after the last ``think_end``; ``""`` when there is none.
      * ``"tail"`` — the last ``tail_chars`` characters, ignoring ``think_end``.
      * ``"full"`` — the whole text.

    Then the caps apply, each keeping the end of the text: ``max_chars`` characters, and
    ``max_tokens`` tokens of ``tokenizer`` (required when ``max_tokens`` is given). ``None`` turns a
    cap off. A cut made inside a word moves forward to the next whitespace when there is one, so
    references do not start with half a word. Surrounding whitespace is stripped.
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"mode must be one of {ANSWER_MODES}, got {mode!r}")
    for name, value in (("max_chars", max_chars), ("max_tokens", max_tokens), ("tail_chars", tail_chars)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer to count tokens; pass tokenizer=")

    has_think_end = bool(think_end) and think_end in text
    if mode == "full":
        component = text
    elif mode == "after_think" or (mode == "auto" and has_think_end):
        component = text.rsplit(think_end, 1)[1] if has_think_end else ""
    else:  # "tail", or "auto" without think_end
        component = _keep_tail_chars(text, tail_chars)

    if max_chars is not None:
        component = _keep_tail_chars(component, max_chars)
    if max_tokens is not None:
        ids = tokenizer.encode(component, add_special_tokens=False)
        if len(ids) > max_tokens:
            component = tokenizer.decode(ids[len(ids) - max_tokens:] if max_tokens else [],
                                         skip_special_tokens=True)
    return component.strip()


def _keep_tail_chars(text: str, limit: int) -> str:
    """The last ``limit`` characters of ``text``; a cut inside a word moves to the next space."""
    if len(text) <= limit:
        return text
    tail = text[len(text) - limit:] if limit else ""
    if tail and not text[len(text) - limit - 1].isspace() and not tail[0].isspace():
        space = re.search(r"\s", tail)
        if space is not None and tail[space.end():].strip():
            tail = tail[space.end():]
    return tail


# --------------------------------------------------------------------------------------------
# Final answer extraction
# --------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# A number as people write it in answers: sign, thousands commas, decimals, a simple a/b fraction.
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\w])"
    r"|(?<![\w.])-?\.\d+(?![\w])")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    ``\\boxed 5`` (no braces) yields ``"5"``. An unclosed last box is skipped in favour of the one
    before it. Returns ``None`` when there is no complete box.
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        rest = text[match.end():]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            start = match.end() + len(rest) - len(stripped)
            depth = 0
            for i in range(start, len(text)):
                if text[i - 1] == "\\":  # an escaped \{ or \} is content, not structure
                    continue
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1:i].strip()
        elif rest[:1].isspace() and stripped:
            # "\boxed 5": the next token, up to whitespace or "$".
            token = re.match(r"[^\s$]+", stripped)
            if token is not None:
                return token.group(0).rstrip(".")
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (``-1,234.5``, ``.5``, ``3/4`` count), or ``None``."""
    matches = _NUMBER_RE.findall(text)
    return re.sub(r"\s+", "", matches[-1]) if matches else None


def extract_final_answer(text: str, *, think_end: str = THINK_END) -> str | None:
    """The answer a grader compares: the last ``\\boxed{...}``, else the last number, else ``None``.

    When the text has a ``think_end``, the part after the last one (the model's stated answer) is
    searched first, box then number; only when it has neither is the whole text searched, so a
    boxed answer inside the reasoning still counts when the model stated nothing after it.
    """
    if not text:
        return None
    parts = [text.rsplit(think_end, 1)[1], text] if think_end and think_end in text else [text]
    for part in parts:
        boxed = extract_boxed(part)
        if boxed:
            return boxed
        number = extract_last_number(part)
        if number is not None:
            return number
    return None


# --------------------------------------------------------------------------------------------
# Normalisation and comparison
# --------------------------------------------------------------------------------------------

_TEXT_COMMANDS = ("text", "textbf", "textit", "mbox", "mathrm", "textrm", "mathbf")
_TEXT_RE = re.compile(r"\\(?:" + "|".join(_TEXT_COMMANDS) + r")\s*\{([^{}]*)\}")
# Unit words written without \text, after a number ("12 cm", "5 dollars").
_UNIT_WORDS = (
    "degrees?", "cm", "mm", "km", "m", "meters?", "centimeters?", "inch(?:es)?", "feet", "foot",
    "ft", "miles?", "yards?", "units?", "sq", "square", "cubic", "hours?", "minutes?", "seconds?",
    "days?", "weeks?", "years?", "dollars?", "cents?", "pounds?", "lbs?", "kg", "g", "grams?",
    "liters?", "ml", "mph", "percent", "points?", "people", "students?", "apples?", "ways?",
)
_TRAILING_UNITS_RE = re.compile(
    r"^(-?[\d.,/]+)\s*(?:(?:" + "|".join(_UNIT_WORDS) + r")\b\s*(?:\^?\{?[23]\}?)?\s*)+$")
_ASSIGNMENT_RE = re.compile(r"^[a-zA-Z]\w{0,2}(?:\([a-zA-Z]\))?\s*=\s*(?!=)")


_NUMERAL_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def _canonical_numeral(match: re.Match) -> str:
    """``007`` -> ``7``, ``0.50`` -> ``0.5``, ``5.`` / ``5.00`` -> ``5``, ``.5`` -> ``0.5``."""
    integer, _, fraction = match.group(0).partition(".")
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{integer}.{fraction}" if fraction else integer


def normalize_answer(answer: str | None) -> str | None:
    """Canonical string form of a math answer (``None`` stays ``None``).

    Steps, in order: unwrap ``\\boxed{}`` and ``$``; drop ``\\left``/``\\right``, ``\\displaystyle``
    and LaTeX spacing (``\\!``, ``\\,``, ``\\;``, ``\\:``, ``\\ ``, ``~``); ``\\dfrac``/``\\tfrac``
    -> ``\\frac``; ``\\text{...}``-like groups are dropped when other content remains (units) and
    unwrapped otherwise (``\\text{(A)}`` -> ``(A)``); degrees, ``%``, ``\\$`` and unit words after a
    number are dropped; a leading ``x =`` is dropped; trailing periods and all whitespace go;
    thousands commas go (``1,000`` -> ``1000``, ``1{,}000`` too); decimals lose trailing zeros
    (``0.50`` -> ``0.5``, ``5.0`` -> ``5``, ``.5`` -> ``0.5``); ``a/b`` and ``\\frac12`` become
    ``\\frac{a}{b}``; ``\\sqrt2`` -> ``\\sqrt{2}``.
    """
    if answer is None:
        return None
    # One pass can expose new work for the next (e.g. "..0" -> ".0" -> "0"); iterate to a fixed
    # point so that normalising twice changes nothing.
    current = str(answer)
    for _ in range(8):
        normalized = _normalize_once(current)
        if normalized == current:
            break
        current = normalized
    return current


def _normalize_once(answer: str) -> str:
    s = answer.strip()
    boxed = extract_boxed(s)
    if boxed is not None and re.fullmatch(r"\$*\s*\\(?:boxed|fbox)\s*\{.*\}\s*\$*\.?", s, re.S):
        s = boxed
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[!,;: ]|~", " ", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("{,}", ",")

    # \text{...}: units next to other content are dropped; a lone \text{...} is its content.
    without_text = _TEXT_RE.sub("", s).strip()
    if without_text and without_text not in ("^", "^{}"):
        s = without_text
    else:
        s = _TEXT_RE.sub(lambda m: m.group(1), s)

    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    s = _ASSIGNMENT_RE.sub("", s) if s.count("=") == 1 else s
    units = _TRAILING_UNITS_RE.match(s)
    if units is not None:
        s = units.group(1)
    s = re.sub(r"\s+", "", s).rstrip(".")

    # Numbers.
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = _NUMERAL_RE.sub(_canonical_numeral, s)
    if s in ("-0", "+0"):
        s = "0"
    s = re.sub(r"^\+(?=\d)", "", s)

    # Fractions and roots: \frac12 -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}, a/b -> \frac{a}{b}.
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    simple_fraction = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if simple_fraction is not None:
        sign, numerator, denominator = simple_fraction.groups()
        s = f"{sign}\\frac{{{numerator}}}{{{denominator}}}"
    s = re.sub(r"^-\\frac\{(\d+)\}\{(\d+)\}$", r"\\frac{-\1}{\2}", s)
    return s


def parse_number(answer: str | None) -> Fraction | None:
    """Exact rational value of a (normalised) answer, or ``None`` when it is not a plain number.

    Accepts integers, decimals, ``a/b`` and ``\\frac{a}{b}`` (with a sign), after
    :func:`normalize_answer`.
    """
    s = normalize_answer(answer)
    if not s:
        return None
    try:
        if re.fullmatch(r"-?\d+(?:\.\d+)?", s):
            return Fraction(s)
        frac = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
        if frac is not None:
            sign, numerator, denominator = frac.groups()
            value = Fraction(numerator) / Fraction(denominator)
            return -value if sign else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answer_key(answer: str | None) -> str | None:
    """The key answers are grouped by for voting and compared by for grading.

    Plain numbers map to their exact value (so ``0.5``, ``1/2``, ``\\frac{1}{2}`` share one key),
    everything else to :func:`normalize_answer`. ``None`` and empty answers have key ``None``.
    """
    number = parse_number(answer)
    if number is not None:
        return f"#{number.numerator}/{number.denominator}"
    normalized = normalize_answer(answer)
    return normalized or None


def answers_equal(prediction: str | None, reference: str | None) -> bool:
    """True when both answers exist and have the same :func:`answer_key`."""
    key = answer_key(prediction)
    return key is not None and key == answer_key(reference)


def majority_vote(answers: Sequence[str | None] | Iterable[str | None]) -> tuple[str | None, int]:
    """Self-consistency vote (Cons@N): the most frequent answer and its count.

    Answers are grouped by :func:`answer_key`; ``None``/empty answers do not vote. Ties go to the
    group whose first member appears earliest, and the winner is that first member as written.
    Returns ``(None, 0)`` when nobody answered.
    """
    counts: dict[str, int] = {}
    first_seen: dict[str, tuple[int, str]] = {}
    for position, answer in enumerate(answers):
        key = answer_key(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_seen.setdefault(key, (position, answer))
    if not counts:
        return None, 0
    best = min(counts, key=lambda k: (-counts[k], first_seen[k][0]))
    return first_seen[best][1], counts[best]
