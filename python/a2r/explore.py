"""The explorer: sample many reasoning paths from one prompt over a tree-shared KV cache.

The prompt is prefilled once; its KV blocks are shared by every branch (``TreeKVCache.fork`` is
zero copy). Each decode step runs all live branches as one ``[n_live, 1]`` batch through the
model with :func:`a2r_kernels.tree_decode_attention`; a branch that stops leaves the batch and its
blocks go back to the pool.

Host syncs: when a branch can stop early (EOS ids or stop strings), each step reads the sampled
tokens ``[n_live]`` once (a non-blocking copy into a pinned buffer) to check stops; when none can
(``max_new_tokens`` only), the steps read nothing and a level's tokens come back in one read at its
end. Everything else (forward, warping, sampling) stays on the device. Each branch is one
:class:`_Branch` (its tree position, sequence and tokens). With ``confidence=`` (issue 22,
:mod:`a2r.confidence`) each token's confidence and the online stop's flags are computed on the
device and come back in the same read as the tokens (packed ``[3, n_live]``); a branch the online
stop ends gives its reserved slot and its blocks back in that step.

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
reuse). What a call is given before its loop (stop criteria, the pool, the prompt check) is
:mod:`a2r.explore_setup`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from a2r_kernels.errors import CacheFullError
from a2r_kernels.vocab import check_token_ids
from a2r_kernels.hf import TreeDecoder
from a2r_kernels.layout import host_to_device

from .confidence import ConfidenceConfig, explore_with_warmup, lowest_group_confidence
from .confidence_tracker import WindowTracker
from .explore_setup import Pool, Stops, check_prompt, tree_blocks_needed
from .sampling import SamplingParams, sample_next, sampling_params

__all__ = ["ExploreResult", "explore", "sample_parallel", "tree_blocks_needed"]


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
        stop_reasons: per leaf, why it ended: ``"eos"`` (a stop token or string), ``"length"``
            (its token budget) or ``"confidence"`` (the online stop).
        confidences: with ``confidence=``: per leaf, each generated token's confidence (of the
            distribution it was sampled from; :func:`a2r.confidence_tracker.token_confidence`);
            else [].
        lowest_group_confidence: with ``confidence=``: per leaf, its lowest group confidence
            (``nan`` for a leaf with no tokens); else [].
        threshold: the online stop's threshold (given, or set by the warm-up), else None.
        warmup_paths: leaves ``0 .. warmup_paths - 1`` are the warm-up paths (run without the
            threshold); 0 without a warm-up.
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
    stop_reasons: list[str] = field(default_factory=list)
    confidences: list[list[float]] = field(default_factory=list)
    lowest_group_confidence: list[float] = field(default_factory=list)
    threshold: float | None = None
    warmup_paths: int = 0


@dataclass
class _Branch:
    """One branch of an exploration: where it sits in the tree, its sequence, its tokens."""

    key: tuple[int, ...]   # child index per level, root first: the leaves' (tree) order
    seq: int               # its sequence in the decoder
    tokens: list[int]      # generated below the prompt, all levels so far
    index: int = 0         # its row among the level's branches (its sampling-noise row)
    stopped: bool = False  # ended at a stop token (else at the token budget)
    confidences: list[float] = field(default_factory=list)   # per token (with a tracker)
    confidence_stop: bool = False   # stopped by the online confidence stop


class _TokenReader:
    """Brings one step's sampled tokens ``[n]`` (or, with confidence tracking, the packed
    ``[3, n]`` of :meth:`WindowTracker.pack`) to the host: :meth:`start` queues a non-blocking
    copy into a pinned buffer, :meth:`wait` waits for that copy alone (the step's one host sync)
    and returns them as a list; the host works on in between. On the CPU they are already
    there."""

    def __init__(self, capacity: int, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.buffer = torch.empty(capacity, dtype=torch.int64, pin_memory=self.on_cuda)
        self.copied = torch.cuda.Event() if self.on_cuda else None
        self.pending: torch.Tensor | None = None

    def start(self, token_ids: torch.Tensor) -> None:
        if self.on_cuda:
            host = self.buffer[:token_ids.numel()].view(token_ids.shape)
            host.copy_(token_ids, non_blocking=True)
            self.copied.record()
            token_ids = host
        self.pending = token_ids

    def wait(self) -> list[int]:
        if self.on_cuda:
            self.copied.synchronize()
        tokens, self.pending = self.pending.tolist(), None
        return tokens


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def explore(model, input_ids: torch.Tensor, widths: Sequence[int], max_new_tokens,
            sampling: SamplingParams | None = None, *, eos_token_id=None, seed: int | None = None,
            stop_strings: Sequence[str] | None = None, tokenizer=None,
            backend: str | None = None, block_size: int | None = None,
            num_blocks: int | None = None, parent: int | None = None,
            keep_parent: bool = False, confidence: ConfidenceConfig | None = None,
            **sampling_fields) -> ExploreResult:
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
        backend, block_size, num_blocks: the pool built for a model (default ``"auto"``,
            ``a2r_kernels.vocab.DEFAULT_BLOCK_SIZE`` and :func:`tree_blocks_needed`, exact for
            this exploration); with a decoder they are the
            decoder's, and passing one is a ValueError.
        parent: with a decoder, a live sequence of it whose tokens precede ``input_ids`` (a shared
            prefix): the prompt is appended to a fork of it (positions ``L .. L + P - 1`` after
            its L tokens, causal over the gathered path; its KV is reused, nothing is copied)
            instead of prefilled from empty. Stop strings are then matched on the generated text
            after the tail of ``input_ids`` (the parent's tokens are not decoded).
        keep_parent: False hands ``parent`` over: it is freed when the call ends (its blocks live
            on while the call's sequences use them). True leaves it alive for later forks; it is
            read-only from then on (it has been forked).
        confidence: a :class:`~a2r.confidence.ConfidenceConfig` tracks each token's confidence
            on the device (read with the step's tokens: no extra host sync) and, with a
            threshold or warm-up paths, stops a branch whose group confidence falls below the
            threshold in that step (its reserved slot and its own blocks go back to the pool
            then). A warm-up needs one level: the prompt is prefilled once and both phases
            fork it. None (default): nothing is tracked and the outputs are as without it.

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
                    Stops(eos_token_id, stop_strings, tokenizer),
                    Pool(backend, block_size, num_blocks), seed=seed, parent=parent,
                    keep_parent=keep_parent, confidence=confidence)


def _explore(model, input_ids, widths: list[int], budgets: list[int], sampling: SamplingParams,
             stops: Stops, pool: Pool, *, seed, parent, keep_parent,
             confidence: ConfidenceConfig | None = None) -> ExploreResult:
    """:func:`explore` after its tree arguments (``widths``, per-level ``budgets``) were
    checked (by it or by :func:`sample_parallel`, under their own names) and its sampling knobs
    gathered: checks the rest once, builds the pool for a model, runs the loop (twice below one
    prompt with a confidence warm-up)."""
    input_ids = check_prompt(input_ids)
    stops = stops.checked()
    if parent is None and keep_parent:
        raise ValueError("keep_parent=True needs parent= (there is no parent sequence to keep)")
    if confidence is not None and not isinstance(confidence, ConfidenceConfig):
        raise ValueError("confidence must be an a2r.confidence.ConfidenceConfig or None, got "
                         f"{type(confidence).__name__}")
    if confidence is not None and confidence.warmup_paths:
        if len(widths) != 1:
            raise ValueError(f"confidence.warmup_paths needs one level (widths=[n]), got {widths}")
        if not confidence.warmup_paths < widths[0]:
            raise ValueError(f"confidence.warmup_paths must be in [1, n - 1] = [1, "
                             f"{widths[0] - 1}], got {confidence.warmup_paths}")
    decoder = pool.decoder_for(model, input_ids, widths, budgets, parent)
    if decoder.planned_step is not None:
        raise ValueError("the decoder has a planned decode step (TreeDecoder.plan_step): "
                         "run_step or cancel_step it first")
    parent_tokens = 0
    if parent is not None:
        try:
            parent_tokens = decoder.length(parent)
        except ValueError as err:
            raise ValueError(f"parent must be a live sequence of the decoder: {err}") from None
    stop = stops.criteria(decoder.model, input_ids)

    def run(phase_widths: list[int], config, root=None, noise_rows=None) -> ExploreResult:
        """The loop over ``phase_widths`` below the prompt (or below a fork of ``root``)."""
        generator = None
        if seed is not None and sampling.temperature > 0:   # each phase draws from the seed
            generator = torch.Generator(device=decoder.device)
            generator.manual_seed(seed)
        tracker = None if config is None else WindowTracker(config, decoder.device)
        exploration = _Exploration(decoder, sampling, generator, stop, tracker, noise_rows)
        try:
            reused = exploration.start(input_ids, parent, root)
            for level, (width, budget) in enumerate(zip(phase_widths, budgets)):
                exploration.level(width, budget, last_level=level == len(phase_widths) - 1,
                                  reader_rows=math.prod(phase_widths))
        finally:
            exploration.close()
        return exploration.result(input_ids.shape[1], config, reused)

    try:
        if confidence is not None and confidence.warmup_paths:
            result = _explore_warmup(decoder, input_ids, parent, widths[0], confidence, run)
        else:
            result = run(widths, confidence)
    finally:
        if parent is not None and not keep_parent:
            decoder.free(parent)
    result.reused_prefix_tokens += parent_tokens
    return result


def _prompt_root(decoder: TreeDecoder, input_ids: torch.Tensor, parent: int | None):
    """``(root, logits [1, V] of its next token, prompt tokens whose KV came from the cache)``:
    the prompt prefilled, or appended to a fork of ``parent``."""
    if parent is None:   # reuses whatever whole blocks of the prompt the pool caches
        # TreeDecoder counts what its prefills reuse; this call's is the one prefill's.
        reused_before = decoder.reused_tokens
        root, root_logits = decoder.prefill(input_ids)
        return root, root_logits, decoder.reused_tokens - reused_before
    # (prefill checks the ids itself, on its host copy; extend would say token_ids)
    check_token_ids(input_ids, decoder.vocab_size, "input_ids")
    root = decoder.fork(parent, 1)[0]
    try:
        return root, decoder.extend([root], input_ids), 0
    except BaseException:
        decoder.free(root)
        raise


def _explore_warmup(decoder: TreeDecoder, input_ids, parent, n: int, confidence, run):
    """The online stop with warm-up paths (:func:`a2r.confidence.explore_with_warmup`): the
    prompt is prefilled (or appended to ``parent``) once and both phases fork it; their noise
    rows are rows of one ``[n, V]`` draw per step, so path i samples as it would in one run."""
    root, logits, reused = _prompt_root(decoder, input_ids, parent)
    try:
        result = explore_with_warmup(
            lambda count, first_row, config: run([count], config, (root, logits), (first_row, n)),
            n, confidence)
    finally:
        decoder.free(root)
    result.reused_prefix_tokens = reused
    return result


class _Exploration:
    """The loop of one :func:`explore` call over its decoder: the frontier of branches with the
    logits of their next token, the leaves, and the sequences it owns (freed by :meth:`close`).
    With a :class:`~a2r.confidence_tracker.WindowTracker` it tracks each token's confidence and
    ends the branches the online stop flags; ``noise_rows=(first, total)``: a warm-up phase,
    whose branch i samples with row ``first + i`` of a ``[total, V]`` draw per step."""

    def __init__(self, decoder: TreeDecoder, sampling: SamplingParams, generator, stop,
                 tracker: WindowTracker | None = None, noise_rows: tuple[int, int] | None = None):
        self.decoder = decoder
        self.sampling = sampling
        self.generator = generator
        self.stop = stop
        self.tracker = tracker
        self.noise_first, self.noise_total = noise_rows or (0, None)
        # Can a branch end before its budget? If not, the loop never needs a token on the host.
        self.can_stop = (bool(stop.eos_ids) or bool(stop.stop_strings)
                         or (tracker is not None and tracker.threshold is not None))
        self.owned: set[int] = set()   # live sequences this call created: freed on the way out
        self.leaves: list[_Branch] = []
        self.frontier: list[tuple[_Branch, torch.Tensor]] = []   # (branch, logits [1, V])
        self.decode_steps = 0
        self.reader: _TokenReader | None = None

    def start(self, input_ids: torch.Tensor, parent: int | None, root=None) -> int:
        """The root below the prompt (or a fork of ``root``, ``(sequence, logits)``, a prompt
        prefilled once for a warm-up's phases); returns the prompt tokens whose KV came from the
        cache."""
        if root is not None:
            seq, root_logits, reused = self.decoder.fork(root[0], 1)[0], root[1], 0
        else:
            seq, root_logits, reused = _prompt_root(self.decoder, input_ids, parent)
        self.owned.add(seq)
        self.frontier = [(_Branch((), seq, []), root_logits)]
        return reused

    def sample(self, logits: torch.Tensor, live: list[_Branch], level_size: int) -> torch.Tensor:
        """Tokens ``[len(live)]`` (on the device) for the live branches of a level."""
        noise = None
        if self.sampling.temperature > 0:
            # Draw for every branch of the level, live or not, then keep the live rows: a
            # branch's draws stay the same whichever other branches have stopped.
            rows = self.noise_total or level_size
            noise = torch.empty((rows, logits.shape[-1]), dtype=torch.float32,
                                device=logits.device).exponential_(1.0, generator=self.generator)
            if len(live) < rows:
                noise = noise.index_select(0, host_to_device(torch.tensor(
                    [self.noise_first + b.index for b in live], dtype=torch.int64),
                    logits.device))
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
        branch.confidence_stop = branch.confidence_stop and not branch.stopped
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
            live += [_Branch(branch.key + (c,), kid, list(branch.tokens), index=len(live) + c,
                             confidences=list(branch.confidences))
                     for c, kid in enumerate(kids)]
            rows += [row] * width
        if self.tracker is not None:   # each kid starts from its parent's window
            self.tracker.fork([parent for parent in range(len(self.frontier))
                               for _ in range(width)])
        return live, (torch.cat(rows, dim=0) if rows else None)

    def level(self, width: int, budget: int, *, last_level: bool, reader_rows: int) -> None:
        """One level: fork, then up to ``budget`` steps of sampling, stop checks and decoding."""
        decoder = self.decoder
        if not self.frontier:   # every branch stopped at an earlier level: they are the leaves
            return
        if self.can_stop and self.reader is None:
            packed_rows = 1 if self.tracker is None else 3
            self.reader = _TokenReader(reader_rows * packed_rows, decoder.device)
        live, logits = self.fork(width)
        level_size = len(live)
        unread: list[torch.Tensor] = []   # [len(live)] tokens (or [3, len(live)]) per step
        for step in range(budget):
            next_ids = self.sample(logits, live, level_size)        # [len(live)] on the device
            # Fed for its logits unless it is the last token of the last level.
            feed = step < budget - 1 or not last_level
            # With a tracker: tokens, confidences and stop flags, read together.
            packed = (next_ids if self.tracker is None
                      else WindowTracker.pack(next_ids, *self.tracker.step(logits)))
            if self.can_stop:
                self.reader.start(packed)
            # Step t + 1's slots and plan for every branch that may still be alive, while
            # step t runs on the device (no host sync: the read above is not waited on yet).
            planned = feed and self.plan([b.seq for b in live])
            if self.can_stop:
                live, next_ids = self._read_stops(live, next_ids, feed, planned)
            else:
                unread.append(packed)
            if not live or not feed:
                break
            logits = decoder.run_step(next_ids)
            self.decode_steps += 1
        if unread:   # no stop could fire: the level's tokens in one read
            tokens, confidences, _ = self._unpacked(torch.stack(unread, dim=-1).tolist())
            for row, branch in enumerate(live):
                branch.tokens += tokens[row]
                if confidences is not None:
                    branch.confidences += confidences[row]
        if last_level:
            for branch in list(live):
                self.finish(branch)
            self.frontier = []
        else:
            self.frontier = [(branch, logits[row:row + 1]) for row, branch in enumerate(live)]

    def _unpacked(self, values: list) -> tuple[list, list | None, list | None]:
        """Tokens, confidences and stop flags of a read (None for the last two without a
        tracker)."""
        return (values, None, None) if self.tracker is None else WindowTracker.unpack(values)

    def _read_stops(self, live: list[_Branch], next_ids: torch.Tensor, feed: bool,
                    planned: bool) -> tuple[list[_Branch], torch.Tensor]:
        """Wait for the step's tokens (and confidences), append them, and retire the branches
        that stopped (or that are not fed again); returns the branches still alive and their
        tokens. A branch the online stop flags ends here: its reserved slot and its blocks are
        free before the next forward."""
        keep, done = [], []
        tokens, confidences, low = self._unpacked(self.reader.wait())
        for row, (branch, token) in enumerate(zip(live, tokens)):
            branch.tokens.append(token)
            branch.stopped = self.stop(branch.tokens)
            if confidences is not None:
                branch.confidences.append(confidences[row])
                branch.confidence_stop = low[row] and feed
            ended = branch.stopped or branch.confidence_stop or not feed
            (done if ended else keep).append(row)
        if done and planned:   # their just-reserved slots go back first
            self.decoder.drop_from_step([live[row].seq for row in done])
        for row in done:
            self.finish(live[row])
        if done:
            live = [live[row] for row in keep]
            kept = host_to_device(torch.tensor(keep, dtype=torch.int64), next_ids.device)
            next_ids = next_ids.index_select(0, kept)
            if self.tracker is not None:
                self.tracker.keep(kept)
        if live and feed and not planned:   # the pool was full before the stops
            self.decoder.plan_step([b.seq for b in live])
        return live, next_ids

    def close(self) -> None:
        """Free every sequence this call created, on error too."""
        self.decoder.cancel_step()   # an error between plan and run: give its slots back
        for seq in sorted(self.owned):
            self.decoder.free(seq)

    def result(self, prompt_len: int, config: ConfidenceConfig | None,
               reused: int) -> ExploreResult:
        """The :class:`ExploreResult` of the finished loop: its leaves in tree order."""
        decoder = self.decoder
        leaves = sorted(self.leaves, key=lambda branch: branch.key)
        tracked = {} if config is None else dict(
            confidences=[b.confidences for b in leaves], threshold=self.tracker.threshold,
            lowest_group_confidence=[lowest_group_confidence(b.confidences, config.window)
                                     for b in leaves])
        return ExploreResult(
            sequences=[b.tokens for b in leaves], stopped=[b.stopped for b in leaves],
            prompt_len=prompt_len, num_blocks=decoder.cache.num_blocks,
            block_size=decoder.cache.block_size, peak_blocks_used=decoder.peak_blocks_used,
            peak_kv_bytes=decoder.peak_kv_bytes, decode_steps=self.decode_steps,
            reused_prefix_tokens=reused, stop_reasons=[
                "eos" if b.stopped else "confidence" if b.confidence_stop else "length"
                for b in leaves], **tracked)


def sample_parallel(model, input_ids: torch.Tensor, n: int, max_new_tokens: int,
                    sampling: SamplingParams | None = None, *, eos_token_id=None,
                    seed: int | None = None, stop_strings: Sequence[str] | None = None,
                    tokenizer=None, backend: str | None = None, block_size: int | None = None,
                    num_blocks: int | None = None, decoder: TreeDecoder | None = None,
                    confidence: ConfidenceConfig | None = None,
                    **sampling_fields) -> list[list[int]] | ExploreResult:
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
        block_size: tokens per KV block (default ``a2r_kernels.vocab.DEFAULT_BLOCK_SIZE``, 16).
        num_blocks: KV pool size; default exactly what the prompt (once) and ``n`` full branches
            need: ``ceil(P / bs) + n * ceil((max_new_tokens - 1) / bs)``.
        decoder: run in this :class:`~a2r_kernels.hf.TreeDecoder` over ``model`` instead of a
            pool of this call's own (``backend``, ``block_size``, ``num_blocks`` are then the
            decoder's, and passing one is a ValueError): its cache keeps the prompt's blocks
            after the call, so a later prompt that starts with the same whole blocks reuses
            their KV (automatic prefix reuse).
        confidence: a :class:`~a2r.confidence.ConfidenceConfig`: track each token's confidence
            and optionally stop weak branches online (see :func:`explore`); the call then
            returns the whole :class:`ExploreResult` (``sequences``, ``confidences``,
            ``lowest_group_confidence``, ``stop_reasons``, ...).

    Returns:
        ``n`` lists of generated token ids, in branch order; a list ends at and includes the EOS
        token or the token completing a stop string, if one was produced. With ``confidence``:
        the :class:`ExploreResult` (a branch the online stop ended ends at the token of the
        step it stopped in).
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
    result = _explore(model, input_ids, [n], [max_new_tokens],
                      sampling_params(sampling, sampling_fields),
                      Stops(eos_token_id, stop_strings, tokenizer),
                      Pool(backend, block_size, num_blocks), seed=seed, parent=None,
                      keep_parent=False, confidence=confidence)
    return result if confidence is not None else result.sequences
