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
