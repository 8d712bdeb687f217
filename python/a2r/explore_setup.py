"""What one exploration (:func:`a2r.explore.explore`) is given before its loop runs: what ends a
branch early (:class:`Stops`, turned into a :class:`StopCriteria`), the pool it builds for a
model (:class:`Pool`, sized by :func:`tree_blocks_needed`) and the prompt check.

The loop itself, its branches and its one host read per step, are :mod:`a2r.explore`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from a2r_kernels.hf import TreeDecoder
from a2r_kernels.vocab import DEFAULT_BLOCK_SIZE, eos_ids

from .models import stop_ids

__all__ = ["Pool", "StopCriteria", "Stops", "check_prompt", "tree_blocks_needed"]


class StopCriteria:
    """Host-side stop test run on each branch after a token is appended.

    EOS: the token is one of ``eos_ids``. Stop strings (transformers' ``StopStringCriteria``
    semantics): some stop string occurs in the decoded text of prompt + generated tokens and
    overlaps the last token, i.e. it ends after the text of all tokens but the last. Only a tail
    window of tokens is decoded (long enough for the longest stop string).
    """

    def __init__(self, eos_ids: set[int], stop_strings: Sequence[str] | None, tokenizer,
                 prompt_ids: list[int]):
        self.eos_ids = eos_ids
        self.stop_strings = list(stop_strings or [])
        self.tokenizer = tokenizer
        longest = max((len(s) for s in self.stop_strings), default=0)
        # A token decodes to >= 1 character in practice; 2 spare tokens cover merges at the cut.
        self.window = longest + 2
        self.prompt_tail = prompt_ids[-self.window:] if self.stop_strings else []

    def __call__(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.eos_ids:
            return True
        if not self.stop_strings:
            return False
        tail = (self.prompt_tail + tokens)[-self.window:]
        text = self.tokenizer.decode(tail)
        before = len(self.tokenizer.decode(tail[:-1]))
        return any(text.find(s, max(0, before - len(s) + 1)) != -1 for s in self.stop_strings)


@dataclass
class Stops:
    """What ends a branch early (arguments of :func:`a2r.explore.explore`)."""

    eos_token_id: object = None
    stop_strings: Sequence[str] | None = None
    tokenizer: object = None

    def checked(self) -> "Stops":
        """These stops, ``stop_strings`` as a list; a ValueError when they need a tokenizer
        that is missing."""
        stop_strings = self.stop_strings
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= to decode the generated tokens")
        return Stops(self.eos_token_id, stop_strings, self.tokenizer)

    def criteria(self, model, input_ids: torch.Tensor) -> StopCriteria:
        """The :class:`StopCriteria` of a prompt ``input_ids`` ``[1, P]``: ``eos_token_id``'s
        ids, or by default the model's (:func:`a2r.models.stop_ids`), and the stop strings."""
        ids = set(eos_ids(self.eos_token_id) if self.eos_token_id is not None
                  else stop_ids(model))
        return StopCriteria(ids, self.stop_strings, self.tokenizer,
                            input_ids[0].tolist() if self.stop_strings else [])


def tree_blocks_needed(prompt_len: int, widths: Sequence[int], tokens: Sequence[int],
                       block_size: int) -> int:
    """Blocks a full exploration can hold at once: the prompt once, plus for each level every
    branch's stored tokens (``tokens[l]`` at a fork level, where the last sampled token is fed
    before forking; ``tokens[-1] - 1`` at the last level, whose last token is never fed)."""
    blocks = math.ceil(prompt_len / block_size)
    branches = 1
    for level, (width, count) in enumerate(zip(widths, tokens)):
        branches *= width
        stored = count if level < len(widths) - 1 else max(count - 1, 0)
        blocks += branches * math.ceil(stored / block_size)
    return blocks


def check_prompt(input_ids) -> torch.Tensor:
    """``input_ids`` when it is one prompt, int ``[1, P]`` with P >= 1; else a ValueError."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
            or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.int64, torch.int32):
        got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids must be an int64 tensor [1, P] with P >= 1 (one prompt), got {got}")
    return input_ids


@dataclass
class Pool:
    """The pool :func:`a2r.explore.explore` builds for a model (None: the defaults)."""

    backend: str | None = None
    block_size: int | None = None
    num_blocks: int | None = None

    def decoder_for(self, model, input_ids, widths, budgets, parent) -> TreeDecoder:
        """``model`` itself when it is a TreeDecoder (this pool must then be empty), else a
        decoder over it with a pool of this call's own."""
        if isinstance(model, TreeDecoder):
            given = [name for name, value in vars(self).items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} must not be given with a TreeDecoder: the "
                                 "decoder's own are used (pass them to TreeDecoder)")
            return model
        if parent is not None:
            raise ValueError("parent needs a TreeDecoder as model: a sequence id names a "
                             "sequence of the decoder that holds it")
        block_size = DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size
        num_blocks = self.num_blocks
        if num_blocks is None:
            num_blocks = max(tree_blocks_needed(input_ids.shape[1], widths, budgets, block_size),
                             1)
        return TreeDecoder(model, num_blocks, block_size=block_size,
                           backend="auto" if self.backend is None else self.backend)
