"""Twenty explorer outputs recorded before confidence tracking was added (issue 22): greedy and
seeded runs of sample_parallel / explore on the tiny random Qwen3 and Llama models of
test_explore.py. ``python tests/_explore_cases.py`` rewrites tests/data/explore_recorded.json
(only ever from a commit whose explorer is known good)."""

import json
import os
import sys
from pathlib import Path

RECORDED = Path(__file__).parent / "data" / "explore_recorded.json"

# (model, entry, prompt length, prompt seed, widths or n, budget, keyword arguments)
CASES = [
    ("qwen3", "sample", 17, 1, 3, 12, dict(temperature=0)),
    ("llama", "sample", 17, 1, 3, 12, dict(temperature=0)),
    ("qwen3", "sample", 5, 2, 4, 10, dict(temperature=1.0, seed=123)),
    ("llama", "sample", 5, 2, 4, 10, dict(temperature=1.0, seed=123)),
    ("qwen3", "sample", 9, 3, 5, 14, dict(temperature=0.7, top_k=5, seed=7)),
    ("llama", "sample", 9, 3, 5, 14, dict(temperature=0.7, top_k=5, seed=7)),
    ("qwen3", "sample", 21, 4, 6, 11, dict(temperature=1.3, top_p=0.8, seed=11)),
    ("llama", "sample", 21, 4, 6, 11, dict(temperature=1.3, top_p=0.8, seed=11)),
    ("qwen3", "sample", 1, 5, 3, 9, dict(temperature=1.0, seed=5, block_size=4)),
    ("llama", "sample", 1, 5, 3, 9, dict(temperature=1.0, seed=5, block_size=4)),
    ("qwen3", "sample", 12, 6, 6, 16, dict(temperature=1.0, seed=9, eos_token_id=7)),
    ("llama", "sample", 12, 6, 6, 16, dict(temperature=1.0, seed=9, eos_token_id=7)),
    ("qwen3", "sample", 8, 7, 4, 20, dict(temperature=0.9, seed=3, eos_token_id=[3, 50, 91])),
    ("llama", "sample", 8, 7, 4, 20, dict(temperature=0.9, seed=3, eos_token_id=[3, 50, 91])),
    ("qwen3", "explore", 10, 8, [2, 3], [5, 6], dict(temperature=1.0, seed=21)),
    ("llama", "explore", 10, 8, [2, 3], [5, 6], dict(temperature=1.0, seed=21)),
    ("qwen3", "explore", 7, 9, [3, 2], 6, dict(temperature=0)),
    ("llama", "explore", 7, 9, [3, 2], 6, dict(temperature=0)),
    ("qwen3", "explore", 13, 10, [2, 2, 2], [3, 4, 5],
     dict(temperature=1.0, seed=4, eos_token_id=[12, 40])),
    ("llama", "explore", 13, 10, [2, 2, 2], [3, 4, 5],
     dict(temperature=1.0, seed=4, eos_token_id=[12, 40])),
]


def run_case(models, case, **extra):
    """The sequences of one case (``extra``: more keyword arguments for the explorer)."""
    import torch

    import a2r
    from a2r.explore import explore

    kind, entry, length, prompt_seed, shape, budget, kwargs = case
    kwargs = {"eos_token_id": [], **kwargs, **extra}
    ids = torch.randint(0, 160, (1, length), generator=torch.Generator().manual_seed(prompt_seed))
    if entry == "sample":
        out = a2r.sample_parallel(models[kind], ids, shape, budget, backend="torch", **kwargs)
        return out.sequences if hasattr(out, "sequences") else out
    return explore(models[kind], ids, shape, budget, backend="torch", **kwargs).sequences


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from _explore_helpers import _build

    with tempfile.TemporaryDirectory() as tmp:
        models = {k: _build(k, Path(tmp) / k) for k in ("qwen3", "llama")}
        outputs = [run_case(models, case) for case in CASES]
    RECORDED.write_text(json.dumps(outputs) + "\n")
    print(f"wrote {len(outputs)} cases to {RECORDED}")
