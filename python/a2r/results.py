"""What a run produces: each stage's :class:`StageReport`, the KV bytes prompt sharing saved
(:class:`KVSharing`) and the whole :class:`A2RResult`.

KV bytes saved by sharing: the explorer's prompt KV is stored once for N paths instead of N times,
``prompt_tokens * (N - 1) * bytes_per_token`` with
``bytes_per_token = 2 (K and V) * num_layers * num_kv_heads * head_dim * dtype size``; plus
``reused_prefix_tokens * bytes_per_token``: the synthesizer prompt tokens whose KV came from the
cache, neither recomputed nor stored again. With the vLLM engine both are vLLM's prefix caching,
which shares whole blocks: the explorer prompt's full blocks, and the prompt tokens vLLM reports
cached for the synthesizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .extract import answers_equal

__all__ = ["A2RResult", "KVSharing", "StageReport", "joined_trace"]


def joined_trace(traces: Sequence[str]) -> str:
    """The thinker text handed to the synthesizer: the trace itself, or with several traces each
    headed ``Trace i:`` (blank lines between)."""
    if len(traces) == 1:
        return traces[0]
    return "\n\n".join(f"Trace {i}:\n{t}" for i, t in enumerate(traces, 1))


@dataclass
class StageReport:
    """One stage's prompt, outputs and cost.

    ``texts[i]`` is the decoded text of output ``i`` (special tokens removed); ``token_ids[i]`` its
    generated token ids. ``generated_tokens`` sums their lengths; ``seconds`` is wall time of the
    stage (device synchronised). With confidence tracking (issue 22, :mod:`a2r.confidence`):
    ``confidences[i]``, each token's confidence of output ``i``, and ``stop_reasons[i]``, why it
    ended (``"eos"`` / ``"length"`` / ``"confidence"``); else None.
    """

    name: str
    prompt: str
    prompt_tokens: int
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float
    forwarded_tokens: int | None = None
    confidences: list[list[float]] | None = None
    stop_reasons: list[str] | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def processed_tokens(self) -> int:
        """Token positions the stage's model forwarded (the count ``a2r eval``'s cost uses)."""
        if self.forwarded_tokens is not None:
            return self.forwarded_tokens
        return self.prompt_tokens + self.generated_tokens

    def to_dict(self, include_token_ids: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
               "texts": list(self.texts), "generated_tokens": self.generated_tokens,
               "processed_tokens": self.processed_tokens, "seconds": self.seconds}
        if include_token_ids:
            out["token_ids"] = [list(ids) for ids in self.token_ids]
        return out


@dataclass
class KVSharing:
    """KV-cache bytes that prompt sharing saves (see the module docstring for the formula)."""

    prompt_tokens: int               # explorer prompt, stored once for all paths
    num_paths: int
    bytes_per_token: int             # explorer: 2 * layers * kv_heads * head_dim * dtype size
    explorer_saved_bytes: int        # prompt_tokens * (num_paths - 1) * bytes_per_token
    symmetric: bool
    synthesizer_shared_prefix_tokens: int  # symmetric only: common token prefix of the two prompts
    synthesizer_reusable_bytes: int  # synthesizer_shared_prefix_tokens * bytes_per_token
    synthesizer_prefix_reused: bool = False  # the synthesizer read some prompt KV from the cache
    # Tokens of the synthesizer prompt whose KV came from the cache (the explorer's prompt, or an
    # earlier run's): whole blocks, at most the prompt's length - 1 (0: no reuse).
    reused_prefix_tokens: int = 0
    synthesizer_prefill_tokens: int = 0  # synthesizer prompt tokens forwarded: prompt - reused
    synthesizer_saved_bytes: int = 0     # reused_prefix_tokens * bytes_per_token: not recomputed,
                                         # not stored a second time
    reuse_note: str = ""                 # why the prefix was not reused (or how), "" otherwise


@dataclass
class A2RResult:
    """Everything one :meth:`A2RPipeline.run` produced."""

    question: str
    mode: str                                  # "symmetric" | "asymmetric"
    explorer: StageReport
    references: list[str]                      # answer components, one per path
    explorer_answers: list[str | None]         # extract_final_answer of each path
    thinker: StageReport | None
    synthesizer: StageReport
    final_answer: str | None                   # A2R's answer
    pass_at_1_answer: str | None               # first path's answer
    cons_answer: str | None                    # Cons@N
    cons_votes: int
    kv: KVSharing
    seconds: float

    @property
    def trace(self) -> str | None:
        """The thinker text the synthesizer read (its traces joined, see :func:`joined_trace`)."""
        return joined_trace(self.thinker.texts) if self.thinker is not None else None

    @property
    def kv_bytes_saved(self) -> int:
        """Explorer prompt stored once for N paths, plus (symmetric, reused) the synthesizer's
        shared prefix neither recomputed nor stored again."""
        return self.kv.explorer_saved_bytes + self.kv.synthesizer_saved_bytes

    def grade(self, gold: str | None) -> dict[str, float | bool]:
        """Correctness of each method against ``gold`` (see :func:`a2r.extract.answers_equal`).

        ``mean_at_1`` is the fraction of explorer paths whose answer is correct.
        """
        per_path = [answers_equal(a, gold) for a in self.explorer_answers]
        return {
            "pass_at_1": answers_equal(self.pass_at_1_answer, gold),
            "mean_at_1": sum(per_path) / len(per_path) if per_path else 0.0,
            "cons_at_n": answers_equal(self.cons_answer, gold),
            "a2r": answers_equal(self.final_answer, gold),
        }

    def to_dict(self, include_token_ids: bool = False) -> dict[str, Any]:
        return {
            "question": self.question,
            "mode": self.mode,
            "final_answer": self.final_answer,
            "pass_at_1_answer": self.pass_at_1_answer,
            "cons_answer": self.cons_answer,
            "cons_votes": self.cons_votes,
            "explorer_answers": list(self.explorer_answers),
            "references": list(self.references),
            "trace": self.trace,
            "stages": {
                "explorer": self.explorer.to_dict(include_token_ids),
                "thinker": self.thinker.to_dict(include_token_ids) if self.thinker else None,
                "synthesizer": self.synthesizer.to_dict(include_token_ids),
            },
            "kv": asdict(self.kv),
            "kv_bytes_saved": self.kv_bytes_saved,
            "seconds": self.seconds,
        }
