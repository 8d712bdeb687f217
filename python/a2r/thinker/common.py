"""What the thinker families share: the result type and the prompt handling of a generation
call (left-padded rows, EOS trimming)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DiffusionResult", "as_prompt", "cut_after_eos"]


@dataclass
class DiffusionResult:
    """What :func:`a2r.thinker.diffusion_generate` returns with ``return_details=True``.

    Attributes:
        sequences: per row, the generated ids (trimmed at and including the first EOS).
        tokens: int64 ``[B, P + gen_length]``: the padded prompt and the whole generation
            (EOS-filled after a finished row's EOS; no [MASK] left).
        num_forward_calls: model forward calls (a classifier-free-guidance step batches its
            conditional and unconditional passes into one call).
        steps_per_block: denoising steps (= forward calls) of each block; 0 for blocks skipped
            because every row had finished.
        prompt_length: ``P``, the padded prompt length (generation starts at column ``P``).
        encoder_forward_calls: DiffusionGemma only: encoder passes (the prompt once, then one
            per later canvas); ``num_forward_calls`` then counts decoder passes.
    """

    sequences: list[list[int]]
    tokens: torch.Tensor
    num_forward_calls: int
    steps_per_block: list[int] = field(default_factory=list)
    prompt_length: int = 0
    encoder_forward_calls: int = 0


def as_prompt(prompt_ids, attention_mask, pad_token_id,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (prompt int64 [B, P], keep bool [B, P]) on ``device``, left-padded."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
            raise ValueError("prompt_ids must be an int tensor [B, P] (or [P]) with B >= 1, got "
                             f"shape {tuple(prompt_ids.shape)}")
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
        prompt = prompt_ids.to(device=device, dtype=torch.int64)
        if attention_mask is None:
            keep = torch.ones_like(prompt, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or \
                    tuple(attention_mask.shape) != tuple(prompt.shape):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) \
                    else type(attention_mask).__name__
                raise ValueError(f"attention_mask must have prompt_ids' shape "
                                 f"[B={prompt.shape[0]}, P={prompt.shape[1]}], got {got}")
            keep = attention_mask.to(device) != 0
            # Left padding only: once a row's mask turns on it stays on.
            if bool((keep[:, :-1] & ~keep[:, 1:]).any()):
                raise ValueError("attention_mask must be left-padded (zeros, then ones, per row)")
        return prompt, keep
    if attention_mask is not None:
        raise ValueError("attention_mask: pass it only with a prompt_ids tensor; a list of rows "
                         "is left-padded here")
    try:
        rows = [[int(t) for t in row] for row in prompt_ids]
    except (TypeError, ValueError) as exc:
        raise ValueError("prompt_ids must be an int tensor [B, P] or a list of lists of "
                         "ints") from exc
    if not rows:
        raise ValueError("prompt_ids must hold at least one row, got an empty list")
    width = max(len(r) for r in rows)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    prompt = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    keep = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows],
                        dtype=torch.bool).reshape(len(rows), width)
    return prompt.reshape(len(rows), width).to(device), keep.to(device)


def cut_after_eos(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first token of ``eos_ids`` (the whole row if none)."""
    eos = set(eos_ids)
    cut = []
    for row in rows:
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        cut.append(row[:end])
    return cut
