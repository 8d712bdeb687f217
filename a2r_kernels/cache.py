"""Placeholder: TreeKVCache is being written (issue 2)."""


class TreeKVCache:  # pragma: no cover - replaced
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("TreeKVCache is not written yet")
