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
