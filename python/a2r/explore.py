"""The explorer: sample many reasoning paths from one prompt over a tree-shared KV cache.

The prompt is prefilled once; its KV blocks are shared by every branch (``TreeKVCache.fork`` is
zero copy). Each decode step runs all live branches as one ``[n_live, 1]`` batch through the
model with :func:`a2r_kernels.tree_decode_attention`; a branch that stops leaves the batch and its
blocks go back to the pool.

Host syncs: when a branch can stop early (EOS ids or stop strings), each step reads the sampled
tokens ``[n_live]`` once (a non-blocking copy into a pinned buffer) to check stops; when none can
(``max_new_tokens`` only), the steps read nothing and a level's tokens come back in one read at its
end. Everything else (forward, warping, sampling) stays on the device. Each branch is one
:class:`_Branch` (its tree position, sequence and tokens).

Overlap: once step t's forward and sampling are queued, the host reserves the KV slots of step
t + 1 and plans its attention (:meth:`~a2r_kernels.hf.TreeDecoder.plan_step`, no host sync) for
every branch that may still be alive, and only then waits for step t's stop read; the branches it
finds finished give their just-reserved slots back (``drop_from_step``). On CUDA that host work
runs while step t is on the GPU. A pool that cannot hold step t + 1 for every branch is tried
again after the read, for the branches still alive (a reserve that fails changes nothing).

Two entries: :func:`sample_parallel` (``docs/API.md`` section 4: ``n`` branches of one prompt, the
sequences) and :func:`explore`, which runs several levels (sample ``n``, fork each branch into
``m``, ...) through the same loop and returns an :class:`ExploreResult` (sequences, memory and step
statistics). ``explore`` takes a model (a pool of this call's own) or a caller's
:class:`~a2r_kernels.hf.TreeDecoder`, and in a decoder it can continue a *parent* sequence whose
tokens are already in the cache: the prompt tokens are appended to a fork of the parent (one
causal ``extend`` over the gathered path) instead of prefilled from empty, and the parent can stay
alive for other forks. ``sample_parallel(..., decoder=dec)`` gets the same reuse without a parent:
the decoder's prefill reuses every whole block of the prompt its cache holds (automatic prefix
reuse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from a2r_kernels.errors import CacheFullError
from a2r_kernels.vocab import DEFAULT_BLOCK_SIZE, check_token_ids, eos_ids
from a2r_kernels.hf import TreeDecoder
from a2r_kernels.layout import host_to_device

from .models import stop_ids
from .sampling import SamplingParams, sample_next, sampling_params


@dataclass
class ExploreResult:
    """Sequences of one exploration and what they cost.

    Attributes:
        sequences: generated token ids per leaf branch (each ends at and includes a stop token).
        prompt_len: P, the prompt tokens this exploration forwarded (``input_ids``' length).
        num_blocks: blocks in the decoder's pool.
        block_size: tokens per block.
        peak_blocks_used: most blocks held at once (by the decoder since it was built: with a
            caller's decoder this includes what the caller holds). Step t + 1 is reserved
            before step t's stop read, so a branch that stops can hold one more block for that
            moment; :func:`tree_blocks_needed` still bounds it.
        peak_kv_bytes: ``peak_blocks_used`` in bytes (K and V, all layers).
        decode_steps: batched decode forwards run (the prefill not counted).
        stopped: per leaf, whether it ended at a stop token (else at the token budget).
        reused_prefix_tokens: tokens whose KV was reused, not recomputed: those of the parent
            sequence the prompt was appended to, or, prefilled from empty, the prompt's whole
            blocks the decoder's cache held (automatic prefix reuse; 0 in a pool of its own).
    """

    sequences: list[list[int]]
    prompt_len: int
    num_blocks: int
    block_size: int
    peak_blocks_used: int
    peak_kv_bytes: int
    decode_steps: int
    stopped: list[bool] = field(default_factory=list)
    reused_prefix_tokens: int = 0


class _StopCriteria:
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
class _Branch:
    """One branch of an exploration: where it sits in the tree, its sequence, its tokens."""

    key: tuple[int, ...]   # child index per level, root first: the leaves' (tree) order
    seq: int               # its sequence in the decoder
    tokens: list[int]      # generated below the prompt, all levels so far
    index: int = 0         # its row among the level's branches (its sampling-noise row)
    stopped: bool = False  # ended at a stop token (else at the token budget)


class _TokenReader:
    """Brings one step's sampled tokens ``[n]`` to the host: :meth:`start` queues a non-blocking
    copy into a pinned buffer, :meth:`wait` waits for that copy alone (the step's one host sync)
    and returns the tokens; the host works on in between. On the CPU they are already there."""

    def __init__(self, capacity: int, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.buffer = torch.empty(capacity, dtype=torch.int64, pin_memory=self.on_cuda)
        self.copied = torch.cuda.Event() if self.on_cuda else None
        self.pending: torch.Tensor | None = None

    def start(self, token_ids: torch.Tensor) -> None:
        if self.on_cuda:
            host = self.buffer[:token_ids.shape[0]]
            host.copy_(token_ids, non_blocking=True)
            self.copied.record()
            token_ids = host
        self.pending = token_ids

    def wait(self) -> list[int]:
        if self.on_cuda:
            self.copied.synchronize()
        tokens, self.pending = self.pending.tolist(), None
        return tokens


def _eos_ids(model, eos_token_id) -> set[int]:
    """``eos_token_id``'s ids, or by default the model's (:func:`a2r.models.stop_ids`)."""
    return set(eos_ids(eos_token_id) if eos_token_id is not None else stop_ids(model))


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


def _check_prompt(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
            or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.int64, torch.int32):
        got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids must be an int64 tensor [1, P] with P >= 1 (one prompt), got {got}")
    return input_ids


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def explore(model, input_ids: torch.Tensor, widths: Sequence[int], max_new_tokens,
            sampling: SamplingParams | None = None, *, eos_token_id=None, seed: int | None = None,
            stop_strings: Sequence[str] | None = None, tokenizer=None,
            backend: str | None = None, block_size: int | None = None,
            num_blocks: int | None = None, parent: int | None = None,
            keep_parent: bool = False, **sampling_fields) -> ExploreResult:
    """Multi-level exploration: fork the prompt into ``widths[0]`` branches, generate
    ``max_new_tokens[0]`` tokens each, fork every branch into ``widths[1]``, and so on.

    Args:
        model: a transformers causal LM (a pool of ``num_blocks`` blocks is built for this call
            and dropped after it), or a :class:`~a2r_kernels.hf.TreeDecoder` to run in (its
            model, pool, block size and attention backend; what its cache holds afterwards, e.g.
            the prompt's blocks for automatic prefix reuse, stays).
        input_ids: int ``[1, P]``, P >= 1, one prompt, on the model's device: the tokens to
            forward (after ``parent``'s, if given).
        widths: branching factor per level, e.g. ``[4, 2]`` -> up to 8 leaves.
        max_new_tokens: int (same for every level) or one int per level: tokens each branch adds
            at that level (>= 1 at a fork level, >= 0 at the last).
        sampling, eos_token_id, seed, stop_strings, tokenizer, **sampling_fields: as
            :func:`sample_parallel`.
        backend, block_size, num_blocks: the pool built for a model (default ``"auto"``, 16 and
            :func:`tree_blocks_needed`, exact for this exploration); with a decoder they are the
            decoder's, and passing one is a ValueError.
        parent: with a decoder, a live sequence of it whose tokens precede ``input_ids`` (a shared
            prefix): the prompt is appended to a fork of it (positions ``L .. L + P - 1`` after
            its L tokens, causal over the gathered path; its KV is reused, nothing is copied)
            instead of prefilled from empty. Stop strings are then matched on the generated text
            after the tail of ``input_ids`` (the parent's tokens are not decoded).
        keep_parent: False hands ``parent`` over: it is freed when the call ends (its blocks live
            on while the call's sequences use them). True leaves it alive for later forks; it is
            read-only from then on (it has been forked).

    Every sequence the call creates is freed before it returns, on error too. A decoder's pool
    must hold what the caller keeps plus :func:`tree_blocks_needed` ``(P, widths,
    max_new_tokens, block_size)`` blocks, else :class:`~a2r_kernels.CacheFullError`.

    Returns:
        :class:`ExploreResult`. ``sequences`` holds one token list per leaf (the tokens of its
        whole path below the prompt), in tree order (by branch index at each level). A branch
        that stops (EOS / stop string) before its level's budget is a leaf and is not forked
        further, so fewer than ``prod(widths)`` lists may come back.

    Example (a shared prefix prefilled once, two prompts explored below it)::

        dec = TreeDecoder(model, num_blocks)
        root, _ = dec.prefill(shared_ids)                             # [1, S], once
        paths = explore(dec, explorer_rest, [8], 256, parent=root, keep_parent=True)
        answer = explore(dec, synth_rest, [1], 256, SamplingParams(temperature=0), parent=root)
    """
    widths = list(widths) if isinstance(widths, (list, tuple)) else widths
    if not isinstance(widths, list) or not widths or any(not _is_int(w) or w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of ints >= 1, got {widths!r}")
    budgets = ([max_new_tokens] * len(widths) if _is_int(max_new_tokens)
               else list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else None)
    if budgets is None or len(budgets) != len(widths) or not all(map(_is_int, budgets)) \
            or any(b < 0 for b in budgets[-1:]) or any(b < 1 for b in budgets[:-1]):
        raise ValueError(f"max_new_tokens must be an int or {len(widths)} ints (one per level), "
                         f">= 1 per fork level and >= 0 at the last, got {max_new_tokens!r}")
    return _explore(model, input_ids, widths, budgets, sampling_params(sampling, sampling_fields),
                    _Stops(eos_token_id, stop_strings, tokenizer),
                    _Pool(backend, block_size, num_blocks), seed=seed, parent=parent,
                    keep_parent=keep_parent)


@dataclass
class _Stops:
    """What ends a branch early (arguments of :func:`explore`)."""

    eos_token_id: object = None
    stop_strings: Sequence[str] | None = None
    tokenizer: object = None


@dataclass
class _Pool:
    """The pool :func:`explore` builds for a model (None: the defaults)."""

    backend: str | None = None
    block_size: int | None = None
    num_blocks: int | None = None


def _decoder_for(model, input_ids, widths, budgets, pool: _Pool, parent) -> TreeDecoder:
    """``model`` itself when it is a TreeDecoder (``pool`` must then be empty), else a decoder
    over it with a pool of this call's own."""
    if isinstance(model, TreeDecoder):
        given = [name for name, value in vars(pool).items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} must not be given with a TreeDecoder: the "
                             "decoder's own are used (pass them to TreeDecoder)")
        return model
    if parent is not None:
        raise ValueError("parent needs a TreeDecoder as model: a sequence id names a sequence "
                         "of the decoder that holds it")
    block_size = DEFAULT_BLOCK_SIZE if pool.block_size is None else pool.block_size
    num_blocks = pool.num_blocks
    if num_blocks is None:
        num_blocks = max(tree_blocks_needed(input_ids.shape[1], widths, budgets, block_size), 1)
    return TreeDecoder(model, num_blocks, block_size=block_size,
                       backend="auto" if pool.backend is None else pool.backend)


def _explore(model, input_ids, widths: list[int], budgets: list[int], sampling: SamplingParams,
             stops: _Stops, pool: _Pool, *, seed, parent, keep_parent) -> ExploreResult:
    """:func:`explore` after its tree arguments (``widths``, per-level ``budgets``) were
    checked (by it or by :func:`sample_parallel`, under their own names) and its sampling knobs
    gathered: checks the rest once, builds the pool for a model, runs the loop."""
    input_ids = _check_prompt(input_ids)
    stop_strings = stops.stop_strings
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and stops.tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= to decode the generated tokens")
    if parent is None and keep_parent:
        raise ValueError("keep_parent=True needs parent= (there is no parent sequence to keep)")
    decoder = _decoder_for(model, input_ids, widths, budgets, pool, parent)
    if decoder.planned_step is not None:
        raise ValueError("the decoder has a planned decode step (TreeDecoder.plan_step): "
                         "run_step or cancel_step it first")
    parent_tokens = 0
    if parent is not None:
        try:
            parent_tokens = decoder.length(parent)
        except ValueError as err:
            raise ValueError(f"parent must be a live sequence of the decoder: {err}") from None
    generator = None
    if seed is not None and sampling.temperature > 0:
        generator = torch.Generator(device=decoder.device)
        generator.manual_seed(seed)
    eos = _eos_ids(decoder.model, stops.eos_token_id)
    stop = _StopCriteria(eos, stop_strings, stops.tokenizer,
                         input_ids[0].tolist() if stop_strings else [])
    run = _Exploration(decoder, sampling, generator, stop)
    try:
        reused = run.start(input_ids, parent)
        for level, (width, budget) in enumerate(zip(widths, budgets)):
            run.level(width, budget, last_level=level == len(widths) - 1,
                      reader_rows=math.prod(widths))
    finally:
        run.close(parent if parent is not None and not keep_parent else None)
    leaves = sorted(run.leaves, key=lambda branch: branch.key)
    return ExploreResult(sequences=[b.tokens for b in leaves], stopped=[b.stopped for b in leaves],
                         prompt_len=input_ids.shape[1], num_blocks=decoder.cache.num_blocks,
                         block_size=decoder.cache.block_size,
                         peak_blocks_used=decoder.peak_blocks_used,
                         peak_kv_bytes=decoder.peak_kv_bytes, decode_steps=run.decode_steps,
                         reused_prefix_tokens=parent_tokens + reused)


class _Exploration:
    """The loop of one :func:`explore` call over its decoder: the frontier of branches with the
    logits of their next token, the leaves, and the sequences it owns (freed by :meth:`close`)."""

    def __init__(self, decoder: TreeDecoder, sampling: SamplingParams, generator, stop):
        self.decoder = decoder
        self.sampling = sampling
        self.generator = generator
        self.stop = stop
        # Can a branch end before its budget? If not, the loop never needs a token on the host.
        self.can_stop = bool(stop.eos_ids) or bool(stop.stop_strings)
        self.owned: set[int] = set()   # live sequences this call created: freed on the way out
        self.leaves: list[_Branch] = []
        self.frontier: list[tuple[_Branch, torch.Tensor]] = []   # (branch, logits [1, V])
        self.decode_steps = 0
        self.reader: _TokenReader | None = None

    def start(self, input_ids: torch.Tensor, parent: int | None) -> int:
        """The root below the prompt; returns the prompt tokens whose KV came from the cache."""
        decoder = self.decoder
        if parent is None:   # reuses whatever whole blocks of the prompt the pool caches
            # TreeDecoder counts what its prefills reuse; this call's is the one prefill's.
            reused_before = decoder.reused_tokens
            root, root_logits = decoder.prefill(input_ids)
            reused = decoder.reused_tokens - reused_before
            self.owned.add(root)
        else:   # (prefill checks the ids itself, on its host copy; extend would say token_ids)
            check_token_ids(input_ids, decoder.vocab_size, "input_ids")
            root, reused = decoder.fork(parent, 1)[0], 0
            self.owned.add(root)
            root_logits = decoder.extend([root], input_ids)
        self.frontier = [(_Branch((), root, []), root_logits)]
        return reused

    def sample(self, logits: torch.Tensor, live: list[_Branch], level_size: int) -> torch.Tensor:
        """Tokens ``[len(live)]`` (on the device) for the live branches of a level."""
        noise = None
        if self.sampling.temperature > 0:
            # Draw for every branch of the level, live or not, then keep the live rows: a
            # branch's draws stay the same whichever other branches have stopped.
            noise = torch.empty((level_size, logits.shape[-1]), dtype=torch.float32,
                                device=logits.device).exponential_(1.0, generator=self.generator)
            if len(live) < level_size:
                noise = noise.index_select(0, host_to_device(
                    torch.tensor([b.index for b in live], dtype=torch.int64), logits.device))
        return sample_next(logits, self.sampling, noise=noise)

    def plan(self, seqs: list[int]) -> bool:
        """Plan the next step of ``seqs``; False when the pool cannot hold it yet but a stop in
        the pending read may still free room (nothing changed then)."""
        try:
            self.decoder.plan_step(seqs)
        except CacheFullError:
            if not self.can_stop:
                raise
            return False
        return True

    def finish(self, branch: _Branch) -> None:
        self.leaves.append(branch)
        self.decoder.free(branch.seq)
        self.owned.discard(branch.seq)

    def fork(self, width: int) -> tuple[list[_Branch], torch.Tensor | None]:
        """Every frontier branch forked ``width`` ways: the level's branches and their logits."""
        live: list[_Branch] = []
        rows = []
        for branch, row in self.frontier:
            kids = self.decoder.fork(branch.seq, width)
            self.owned.update(kids)
            self.decoder.free(branch.seq)   # the kids hold the shared blocks from now on
            self.owned.discard(branch.seq)
            live += [_Branch(branch.key + (c,), kid, list(branch.tokens), index=len(live) + c)
                     for c, kid in enumerate(kids)]
            rows += [row] * width
        return live, (torch.cat(rows, dim=0) if rows else None)

    def level(self, width: int, budget: int, *, last_level: bool, reader_rows: int) -> None:
        """One level: fork, then up to ``budget`` steps of sampling, stop checks and decoding."""
        decoder = self.decoder
        if not self.frontier:   # every branch stopped at an earlier level: they are the leaves
            return
        if self.can_stop and self.reader is None:
            self.reader = _TokenReader(reader_rows, decoder.device)
        live, logits = self.fork(width)
        level_size = len(live)
        unread: list[torch.Tensor] = []   # [len(live)] tokens per step, read at level end
        for step in range(budget):
            next_ids = self.sample(logits, live, level_size)        # [len(live)] on the device
            # Fed for its logits unless it is the last token of the last level.
            feed = step < budget - 1 or not last_level
            if self.can_stop:
                self.reader.start(next_ids)
            # Step t + 1's slots and plan for every branch that may still be alive, while
            # step t runs on the device (no host sync: the read above is not waited on yet).
            planned = feed and self.plan([b.seq for b in live])
            if self.can_stop:
                live, next_ids = self._read_stops(live, next_ids, feed, planned)
            else:
                unread.append(next_ids)
            if not live or not feed:
                break
            logits = decoder.run_step(next_ids)
            self.decode_steps += 1
        if unread:   # no stop could fire: the level's tokens in one read
            for branch, tokens in zip(live, torch.stack(unread, dim=1).tolist()):
                branch.tokens += tokens
        if last_level:
            for branch in list(live):
                self.finish(branch)
            self.frontier = []
        else:
            self.frontier = [(branch, logits[row:row + 1]) for row, branch in enumerate(live)]

    def _read_stops(self, live: list[_Branch], next_ids: torch.Tensor, feed: bool,
                    planned: bool) -> tuple[list[_Branch], torch.Tensor]:
        """Wait for the step's tokens, append them, and retire the branches that stopped (or
        that are not fed again); returns the branches still alive and their tokens."""
        keep, done = [], []
        for row, (branch, token) in enumerate(zip(live, self.reader.wait())):
            branch.tokens.append(token)
            branch.stopped = self.stop(branch.tokens)
            (done if branch.stopped or not feed else keep).append(row)
        if done and planned:   # their just-reserved slots go back first
            self.decoder.drop_from_step([live[row].seq for row in done])
        for row in done:
            self.finish(live[row])
        if done:
            live = [live[row] for row in keep]
            next_ids = next_ids.index_select(0, host_to_device(
                torch.tensor(keep, dtype=torch.int64), next_ids.device))
        if live and feed and not planned:   # the pool was full before the stops
            self.decoder.plan_step([b.seq for b in live])
        return live, next_ids

    def close(self, parent_to_free: int | None) -> None:
        """Free every sequence this call created (and a handed-over parent), on error too."""
        self.decoder.cancel_step()   # an error between plan and run: give its slots back
        for seq in sorted(self.owned):
            self.decoder.free(seq)
        if parent_to_free is not None:
            self.decoder.free(parent_to_free)


def sample_parallel(model, input_ids: torch.Tensor, n: int, max_new_tokens: int,
                    sampling: SamplingParams | None = None, *, eos_token_id=None,
                    seed: int | None = None, stop_strings: Sequence[str] | None = None,
                    tokenizer=None, backend: str | None = None, block_size: int | None = None,
                    num_blocks: int | None = None, decoder: TreeDecoder | None = None,
                    **sampling_fields) -> list[list[int]]:
    """Sample ``n`` continuations of one prompt whose KV is computed once and shared.

    Args:
        model: a transformers causal LM (Llama / Qwen2 / Qwen3 style, full attention). Its own
            modules run unmodified; attention and the KV cache are a2r_kernels'.
        input_ids: int64 ``[1, P]``, one prompt, on the model's device.
        n: branches (>= 1).
        max_new_tokens: most tokens generated per branch (>= 0).
        sampling: :class:`~a2r.sampling.SamplingParams` (default ``SamplingParams()``: plain
            sampling at temperature 1); or give its fields as keywords (``temperature=0``,
            ``top_p=0.9``, ...), never both. ``temperature=0`` is greedy (every branch equals
            ``model.generate(do_sample=False)``'s continuation); > 0 samples from
            ``softmax(logits / temperature)`` after top-k / top-p / min-p filtering, as
            transformers' warpers.
        eos_token_id: int or list of ints; default the model's ``generation_config``. ``[]``
            disables EOS.
        seed: seeds a ``torch.Generator`` on the model's device: same seed, same branches.
        stop_strings: stop a branch when its text ends in (overlaps its last token with) one of
            these strings, like transformers' ``stop_strings``; needs ``tokenizer``.
        backend: ``tree_decode_attention`` backend (default ``"auto"``).
        block_size: tokens per KV block (default 16).
        num_blocks: KV pool size; default exactly what the prompt (once) and ``n`` full branches
            need: ``ceil(P / bs) + n * ceil((max_new_tokens - 1) / bs)``.
        decoder: run in this :class:`~a2r_kernels.hf.TreeDecoder` over ``model`` instead of a
            pool of this call's own (``backend``, ``block_size``, ``num_blocks`` are then the
            decoder's, and passing one is a ValueError): its cache keeps the prompt's blocks
            after the call, so a later prompt that starts with the same whole blocks reuses
            their KV (automatic prefix reuse).

    Returns:
        ``n`` lists of generated token ids, in branch order; a list ends at and includes the EOS
        token or the token completing a stop string, if one was produced.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if decoder is not None:
        if not isinstance(decoder, TreeDecoder) or decoder.model is not model:
            raise ValueError("decoder must be an a2r_kernels.hf.TreeDecoder over model "
                             f"(decoder.model is model), got {type(decoder).__name__}")
        model = decoder
    return _explore(model, input_ids, [n], [max_new_tokens],
                    sampling_params(sampling, sampling_fields),
                    _Stops(eos_token_id, stop_strings, tokenizer),
                    _Pool(backend, block_size, num_blocks), seed=seed, parent=None,
                    keep_parent=False).sequences
