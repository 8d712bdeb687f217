"""Each stage's prompt: rendered (the tokenizer's chat template, else a plain template) and
encoded once per question.

:class:`PromptBuilder` keeps the prompts of the question it last built for: the up-front length
check (:meth:`A2RPipeline.check_question`), the explorer's pool sizing and the run itself ask for
the same prompts, and each distinct one is rendered and tokenised once. A :class:`Prompt` holds
the text and its token ids (a host list; each engine puts them where it runs).

The synthesizer prompt starts with the question, like the explorer prompt: in the symmetric
set-up the two share that token prefix, and the synthesizer reuses its KV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Prompt", "PromptBuilder", "decode", "encode", "render"]


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and its token ids (``len(ids)`` = the prompt tokens P)."""

    text: str
    ids: tuple[int, ...]

    def tensor(self, device):
        """int64 ``[1, P]`` on ``device``."""
        import torch

        return torch.tensor([self.ids], dtype=torch.long, device=device)


def render(tokenizer, user_message: str, plain_prefix: str, plain_suffix: str) -> str:
    """The prompt text: the tokenizer's chat template when it has one, else a plain template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{plain_prefix}{user_message}{plain_suffix}"


def encode(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of a rendered prompt. A chat template already wrote every special token it
    wants; a plain prompt gets the tokenizer's usual ones (e.g. BOS)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tuple(tokenizer(text, add_special_tokens=not has_template)["input_ids"])


def decode(tokenizer, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
    """The text of generated ``ids`` up to (not including) the first of ``stop_ids``, special
    tokens removed."""
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def numbered(references: Sequence[str]) -> str:
    return "\n".join(f"[{i}] {ref if ref else '(no answer)'}" for i, ref in
                     enumerate(references, start=1))


class PromptBuilder:
    """The stages' prompt texts for a pipeline's tokenizers and ``config``'s instructions, each
    rendered once per question, and their token ids, each text encoded once per question
    (:meth:`encoded`; a pipeline that rewrites a prompt text gets its text encoded)."""

    def __init__(self, config, explorer_tokenizer, thinker_tokenizer, synthesizer_tokenizer):
        self.config = config
        self.explorer_tokenizer = explorer_tokenizer
        self.thinker_tokenizer = thinker_tokenizer
        self.synthesizer_tokenizer = synthesizer_tokenizer
        self._question: str | None = None
        self._memo: dict[tuple, list] = {}   # (kind, texts) -> [(tokenizer, result)]

    def _once(self, question: str, tokenizer, key: tuple, build):
        """``build()`` for ``tokenizer`` and ``key``, computed once per question."""
        if question != self._question:   # keep one question's prompts only
            self._question, self._memo = question, {}
        done = self._memo.setdefault(key, [])
        for owner, result in done:   # the tokenizer object itself (a reference, not its id)
            if owner is tokenizer:
                return result
        done.append((tokenizer, build()))
        return done[-1][1]

    def _render(self, tokenizer, question: str, message: str, prefix: str, suffix: str) -> str:
        return self._once(question, tokenizer, ("render", message, prefix, suffix),
                          lambda: render(tokenizer, message, prefix, suffix))

    def encoded(self, tokenizer, text: str, question: str) -> Prompt:
        """``text`` (a prompt for ``question``) and its token ids, encoded once per question."""
        return self._once(question, tokenizer, ("encode", text),
                          lambda: Prompt(text, encode(tokenizer, text)))

    def explorer(self, question: str) -> str:
        return self._render(self.explorer_tokenizer, question,
                            f"{question}\n{self.config.explorer_instruction}",
                            "Question: ", "\nAnswer:")

    def thinker(self, question: str, references: Sequence[str], tokenizer=None) -> str:
        """The thinker's prompt, rendered with ``tokenizer`` (default: the thinker's)."""
        message = (f"{question}\n\nReference answers:\n{numbered(references)}\n\n"
                   f"{self.config.thinker_instruction}")
        return self._render(tokenizer or self.thinker_tokenizer, question, message, "Question: ",
                            "\nTrace:")

    def synthesizer(self, question: str, references: Sequence[str],
                    trace: str | None = None) -> str:
        message = f"{question}\n\nReference answers:\n{numbered(references)}\n\n"
        if trace:
            message += f"Reasoning trace:\n{trace}\n\n"
        message += self.config.synthesizer_instruction
        return self._render(self.synthesizer_tokenizer, question, message, "Question: ",
                            "\nAnswer:")

    def synthesizer_alone(self, question: str) -> str:
        """The control of ``a2r eval``: the synthesizer on the bare question, no references (the
        explorer's instruction, rendered with the synthesizer's tokenizer)."""
        return self._render(self.synthesizer_tokenizer, question,
                            f"{question}\n{self.config.explorer_instruction}",
                            "Question: ", "\nAnswer:")
