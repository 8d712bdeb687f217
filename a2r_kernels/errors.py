"""Exceptions of the public API."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not compiled, not installed, or wrong device).

    Raised instead of silently falling back to another backend.
    """


class CacheFullError(RuntimeError):
    """The KV block pool cannot hold the requested tokens.

    Raised by :meth:`TreeKVCache.reserve` *before* anything changes (``fork`` is zero copy and
    allocates nothing):
    every existing sequence keeps its tokens, blocks and length.
    """
