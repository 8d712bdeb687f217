"""Grading a predicted answer against a gold one: Math-Verify first, with a hard timeout of ours.

Math-Verify (``math_verify.parse`` / ``math_verify.verify``, the checker most math evals use)
decides whenever it can parse both answers. Its own timeouts use ``signal.alarm``, which raises
off the main thread and would interrupt whatever else holds SIGALRM, so they are turned off
(``parsing_timeout=None``, ``timeout_seconds=None``) and the check runs instead in a worker process
of ours (``python -m a2r.eval._verify_worker``, JSON lines over a pipe). A check that exceeds
``timeout_s`` kills the worker (sympy cannot be interrupted otherwise); the next check starts a
fresh one.

The hand-written normaliser (:func:`a2r.extract.answers_equal`) decides only where Math-Verify
cannot: when it extracts nothing from one side, or when it timed out. Every :class:`Verdict` says
which checker decided, and why when it was not Math-Verify.

Answers are the strings :func:`a2r.extract.extract_final_answer` returns (the content of the last
``\\boxed{}``, else the last number); they are handed to Math-Verify boxed again, so it parses the
whole answer as one expression.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from ..extract import answers_equal, extract_boxed

__all__ = ["CHECKERS", "DEFAULT_CHECK_TIMEOUT_S", "AnswerChecker", "Verdict"]

DEFAULT_CHECK_TIMEOUT_S = 5.0
# Who decided a verdict: Math-Verify; our normaliser (Math-Verify parsed nothing, or timed out);
# nobody ("no_answer": the prediction is missing, so it is wrong).
CHECKERS = ("math_verify", "normalizer", "no_answer")


@dataclass(frozen=True)
class Verdict:
    """``correct``; ``checker`` (one of :data:`CHECKERS`); ``note``: why Math-Verify did not decide."""

    correct: bool
    checker: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _boxed(answer: str) -> str:
    """``answer`` as one boxed expression (unchanged when it already is one)."""
    text = answer.strip()
    if text.startswith("\\boxed") and extract_boxed(text) is not None:
        return text
    return f"\\boxed{{{text}}}"


class AnswerChecker:
    """Checks answers with Math-Verify in a worker process, bounded by ``timeout_s`` per check.

    Usable from any thread (no signals). Verdicts are cached per ``(prediction, gold)``. Call
    :meth:`close` (or use it as a context manager) to stop the worker.
    """

    def __init__(self, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S):
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._worker: subprocess.Popen | None = None
        self._cache: dict[tuple[str, str], Verdict] = {}

    # ---- worker ------------------------------------------------------------------------------

    def _start(self) -> subprocess.Popen:
        if self._worker is None or self._worker.poll() is not None:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "a2r.eval._verify_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            # The worker says "ready" once Math-Verify is imported: that import (sympy) is not
            # part of any one check's time budget.
            line = self._worker.stdout.readline()
            if line.strip() != '"ready"':
                self.close()
                raise RuntimeError("the Math-Verify worker did not start (is math-verify "
                                   "installed? pip install math-verify)")
        return self._worker

    def _kill(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker = None

    def close(self) -> None:
        """Stop the worker (a later check starts a new one)."""
        if self._worker is not None and self._worker.poll() is None:
            try:
                self._worker.stdin.close()
                self._worker.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __enter__(self) -> "AnswerChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _math_verify(self, prediction: str, gold: str) -> tuple[bool | None, str]:
        """(Math-Verify's verdict, "") or (None, why it gave none)."""
        worker = self._start()
        worker.stdin.write(json.dumps({"gold": _boxed(gold), "prediction": _boxed(prediction)})
                           + "\n")
        worker.stdin.flush()
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([worker.stdout], [], [], max(left, 0.0))
            if ready:
                break
            if left <= 0:
                self._kill()
                return None, f"math_verify timed out after {self.timeout_s:g} s"
        reply = json.loads(worker.stdout.readline() or "null")
        if not isinstance(reply, dict):
            self._kill()
            return None, "the Math-Verify worker died"
        if reply.get("error"):
            return None, f"math_verify failed: {reply['error']}"
        if not reply["parsed_gold"] or not reply["parsed_prediction"]:
            side = "gold" if not reply["parsed_gold"] else "prediction"
            return None, f"math_verify parsed nothing from the {side}"
        return bool(reply["correct"]), ""

    # ---- public ------------------------------------------------------------------------------

    def check(self, prediction: str | None, gold: str) -> Verdict:
        """Whether ``prediction`` (an extracted answer, or ``None``) equals ``gold``."""
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"gold must be a non-empty string, got {gold!r}")
        if prediction is None or not str(prediction).strip():
            return Verdict(False, "no_answer")
        key = (str(prediction), gold)
        if key not in self._cache:
            correct, note = self._math_verify(*key)
            if correct is None:
                self._cache[key] = Verdict(answers_equal(*key), "normalizer", note)
            else:
                self._cache[key] = Verdict(correct, "math_verify")
        return self._cache[key]
