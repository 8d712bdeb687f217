"""One verdict line per GPU target, read off the benchmark result files of this run.

    python benchmarks/verdict.py [--results benchmarks/results] [--baseline DIR] [--device NAME]

``gpu_session.sh verify`` runs it last. Each :data:`TARGETS` entry names a result file
(``<results>/<file>.json``), the provider and shape of one row, a metric of that row and the
issue's threshold; the line says ``PASS`` (metric >= threshold), ``FAIL``, ``INFO`` (no
threshold: a baseline reported beside the targets) or ``MISSING`` (no row of this run: the step
was skipped, failed or timed out).

Rows of this run: the result files upsert rows keyed by device and shape, so they also hold
every earlier session's rows (the committed files travel to the device). ``--baseline DIR`` is a
copy of the result files taken before the benchmarks ran; a row equal to a row of the same file
there is an old row and is ignored (a re-measured row always differs: its times are floats).
``--device`` keeps only rows whose ``device`` field is that name.

Metrics: ``copy_fraction`` is ``gbps / copy_gbps`` (unique bytes per second over the device's
copy bandwidth measured in the same run); any other metric is the row's field of that name
(``speedup_vs_paged``, ``speedup_vs_wrapper``, ``speedup_vs_llada-torch``, ``speedup_vs_hf``,
``speedup_vs_hf-eb-sampler``: baseline time / this provider's time, both measured in the same
process).

Exit status 0 whatever the verdicts (they are measurements, not test results); 2 when a result
file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (label, the fields a row must have): the target shapes, all bf16
TREE_8K = ("P=8k N=64 S=128 32/8", dict(P=8192, N=64, S=128, Hq=32, Hkv=8, D=128, dtype="bfloat16"))
TREE_1K = ("P=1k N=4 S=128 8/1", dict(P=1024, N=4, S=128, Hq=8, Hkv=1, D=128, dtype="bfloat16"))
DENOISE = ("B=8 L=256 V=126464", dict(B=8, L=256, V=126464, dtype="bfloat16", masked_fraction=1.0))
EXPLORE = ("P=8k n=32 256 new", dict(P=8192, n=32, new_tokens=256, dtype="bfloat16"))
EB_FLAT, EB_LM = (
    (f"B=8 L=256 V=262144 {kind}", dict(op="entropy-bound", B=8, L=256, V=262144,
                                         dtype="bfloat16", logits=kind))
    for kind in ("flat", "lm-like"))


@dataclass(frozen=True)
class Target:
    issue: int            # the issue that set the target
    file: str             # results/<file>.json
    provider: str
    shape: tuple          # (label, {field: value}): every field must equal the row's
    metric: str           # "copy_fraction" or a row field
    at_least: float | None            # None: reported, not judged (INFO)


# The issues' GPU targets. Rows for later issues go here, next to the benchmark rows that
# gpu_session.sh's verify plan runs for them:
#   issue 13: eager vs graph explore rows, graph decode step within 1.2x of its kernels
TARGETS = [
    Target(2, "tree_attention", "a2r-tree", TREE_8K, "copy_fraction", 0.70),
    Target(2, "tree_attention", "a2r-tree", TREE_8K, "speedup_vs_paged", 8.0),
    Target(2, "tree_attention", "a2r-tree", TREE_1K, "speedup_vs_paged", 1.0),
    Target(6, "tree_attention", "a2r-cuda", TREE_8K, "copy_fraction", 0.70),
    Target(6, "tree_attention", "a2r-cuda", TREE_1K, "speedup_vs_paged", None),
    # graph replay within 1.1x of the kernels run eagerly through the same wrapper
    Target(12, "tree_attention", "a2r-tree-graph", TREE_8K, "speedup_vs_wrapper", 1 / 1.1),
    Target(3, "denoise", "a2r-denoise", DENOISE, "copy_fraction", 0.70),
    Target(3, "denoise", "a2r-denoise", DENOISE, "speedup_vs_llada-torch", 5.0),
    Target(6, "denoise", "a2r-cuda", DENOISE, "copy_fraction", 0.70),
    Target(4, "explore", "a2r-explore", EXPLORE, "speedup_vs_hf", 3.0),
    Target(15, "entropy_bound", "a2r-eb-step", EB_FLAT, "copy_fraction", 0.70),
    Target(15, "entropy_bound", "a2r-eb-step", EB_LM, "copy_fraction", 0.70),
    Target(15, "entropy_bound", "a2r-eb-step", EB_FLAT, "speedup_vs_hf-eb-sampler", 5.0),
    Target(15, "entropy_bound", "a2r-eb-step", EB_LM, "speedup_vs_hf-eb-sampler", 5.0),
    Target(2, "tree_attention_flashinfer", "flashinfer-cascade", TREE_8K, "speedup_vs_paged", None),
    Target(2, "tree_attention_flashinfer", "flashinfer-cascade", TREE_1K, "speedup_vs_paged", None),
]


def load_rows(path: str) -> list[dict]:
    """The rows of one result file; [] when it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def metric_value(row: dict, metric: str) -> float | None:
    if metric == "copy_fraction":
        gbps, copy = row.get("gbps"), row.get("copy_gbps")
        return gbps / copy if gbps is not None and copy else None
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def judge(target: Target, rows: list[dict], old_rows: list[dict],
          device: str | None = None) -> tuple[str, str]:
    """(status, line) for one target over one file's rows; rows equal to an old row are skipped."""
    old = {json.dumps(r, sort_keys=True) for r in old_rows}
    label, fields = target.shape
    what = f"#{target.issue} {target.provider} {target.metric} at {label}"
    matches = [r for r in rows
               if r.get("provider") == target.provider
               and all(r.get(k) == v for k, v in fields.items())
               and (device is None or r.get("device") == device)
               and json.dumps(r, sort_keys=True) not in old]
    if not matches:
        return "MISSING", f"MISSING {what}: no row from this run"
    row = matches[-1]
    value = metric_value(row, target.metric)
    if value is None:
        return "MISSING", f"MISSING {what}: the row has no {target.metric} [{row.get('device')}]"
    if target.at_least is None:
        return "INFO", f"INFO    {what}: {value:.3g} [{row.get('device')}]"
    status = "PASS" if value >= target.at_least else "FAIL"
    return status, (f"{status:<7} {what}: {value:.3g} (target >= {target.at_least:g})"
                    f" [{row.get('device')}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS, help="folder of <file>.json result files")
    parser.add_argument("--baseline", default=None,
                        help="folder with the result files as they were before this run")
    parser.add_argument("--device", default=None, help="only rows of this device name")
    args = parser.parse_args(argv)
    try:
        files = {t.file for t in TARGETS}
        rows = {f: load_rows(os.path.join(args.results, f + ".json")) for f in files}
        old = {f: load_rows(os.path.join(args.baseline, f + ".json")) if args.baseline else []
               for f in files}
    except (OSError, ValueError) as exc:   # json.JSONDecodeError is a ValueError
        print(f"verdict.py: error: {exc}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for target in TARGETS:
        status, line = judge(target, rows[target.file], old[target.file], args.device)
        counts[status] = counts.get(status, 0) + 1
        print(line)
    print("verdict: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
