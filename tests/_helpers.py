"""Small helpers shared by the test modules (imported as ``from _helpers import ...``)."""


class ForwardLog:
    """input_ids shape of every forward of a model (forward pre-hook), while in a ``with``."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def _hook(self, module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.shapes.append(tuple(ids.shape))

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def tokens(self) -> int:
        return sum(b * t for b, t in self.shapes)

    @property
    def prompt_forwards(self) -> list[int]:
        """Tokens of each multi-token forward (prompt prefills / extends; decode steps are 1)."""
        return [t for _, t in self.shapes if t > 1]


class HostReads:
    """Counts the calls that bring a tensor's values to the host (``item``, ``tolist``, ``cpu``,
    ``numpy``, ``bool()``/``int()``/``float()``/``index``) made from the given source files, while
    in a ``with``. On CUDA each is a host sync; on the CPU the count says what it would be."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, *files):
        import os

        self.files = {os.path.abspath(f) for f in files}
        self.count = 0

    def __enter__(self):
        import os
        import sys

        import torch

        self.saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, original in self.saved.items():
            def counted(tensor, *args, _original=original, **kwargs):
                caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
                if caller in self.files:
                    self.count += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        import torch

        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def huge_finite_logits(dtype, vocab: int = 40):
    """Rows ``[10, vocab]`` of finite logits of ``dtype`` at the ends of its range, where
    ``x * log2(e)`` or a difference of two logits overflows fp32: ``torch.finfo(dtype).min`` (what
    transformers' ``InfNanRemoveLogitsProcessor`` writes for -inf) and values up to
    ``finfo.max``. Returns ``(rows, all_min_row)``: row ``all_min_row`` is finfo.min everywhere
    (the uniform distribution); in every other row finfo.min entries have probability 0 exactly
    (another entry is larger by more than 104), so they act as ``-inf`` (banned) entries."""
    import torch

    info = torch.finfo(dtype)
    low, high = info.min, info.max
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(vocab, generator=gen) * 2
    rows = [base.clone() for _ in range(10)]
    rows[0][:vocab // 2] = low                          # the first half at finfo.min
    rows[1][1::2] = low                                 # every other entry
    rows[2][:] = low                                    # all finfo.min: uniform
    rows[3][vocab - 3] = high                           # finfo.max once
    rows[4][[5, vocab - 2]] = high                      # twice: a tie, the lower index
    rows[5][::3] = low                                  # both ends
    rows[5][[4, 17]] = high
    rows[6] = torch.linspace(-1.0, 1.0, vocab) * high   # spread over the whole range
    rows[7] = base.clamp(-3, 3) * (high / 3)            # random, |x| up to finfo.max
    rows[8][::4] = float("-inf")                        # banned entries and finfo.min ones
    rows[8][1::4] = low
    rows[9][:] = low                                    # the max (index 5) not at index 0: at
    rows[9][5] = low * 0.9                              # T < 1 every x / T is -inf
    rows = torch.stack(rows).to(dtype)
    assert not bool(rows.isnan().any()) and bool(torch.isfinite(rows[rows > float("-inf")]).all())
    return rows, 2
