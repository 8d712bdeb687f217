"""Human-readable and JSON reports of A2R runs (``a2r demo``, ``run``, ``eval``)."""

from __future__ import annotations

import json
import sys

__all__ = ["emit_json", "format_bytes", "print_result", "short"]


def short(text: str | None, limit: int = 70) -> str:
    if text is None:
        return "-"
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def format_bytes(n: int) -> str:
    """``1,234 B`` below 1 KiB, else ``136.5 KiB (139,776 B)``."""
    if n < 1024:
        return f"{n:,} B"
    scaled, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:,.1f} {unit} ({n:,} B)"


def print_result(result, models, gold: str | None = None, out=None) -> None:
    """Human-readable report of one A2R run: every stage with its time and tokens."""
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced (tests, redirects)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"Question: {result.question}" + (f"   (gold: {gold})" if gold is not None else ""))
    e = result.explorer
    p(f"  [explorer]    {models['explorer']['arch']}: {len(e.texts)} paths, prompt "
      f"{e.prompt_tokens} tok, {e.generated_tokens} tok generated, {e.seconds:.2f} s")
    for i, (text, answer) in enumerate(zip(e.texts, result.explorer_answers), start=1):
        p(f"      path {i}: answer={answer!s:<10} | {short(text)}")
    if result.thinker is not None:
        t = result.thinker
        p(f"  [thinker]     {models['thinker']['arch']} ({models['thinker']['kind']}): prompt "
          f"{t.prompt_tokens} tok, {t.generated_tokens} tok, {t.seconds:.2f} s")
        for i, text in enumerate(t.texts, start=1):
            p(f"      trace{f' {i}' if len(t.texts) > 1 else ''}: {short(text)}")
    else:
        p("  [thinker]     (none)")
    s = result.synthesizer
    p(f"  [synthesizer] {models['synthesizer']['arch']} ({result.mode}): prompt "
      f"{s.prompt_tokens} tok, {s.generated_tokens} tok generated, {s.seconds:.2f} s")
    p(f"      output: {short(s.texts[0])}")
    kv = result.kv
    p(f"  KV bytes saved by sharing the explorer prompt: {format_bytes(kv.explorer_saved_bytes)}"
      f" = {kv.prompt_tokens} prompt tok x {kv.num_paths - 1} extra paths x "
      f"{kv.bytes_per_token} B/tok")
    if kv.symmetric:
        shared = (f"  symmetric: explorer and synthesizer prompts share "
                  f"{kv.synthesizer_shared_prefix_tokens} tokens")
        if kv.synthesizer_prefix_reused:
            p(f"{shared}; the synthesizer reused {kv.reused_prefix_tokens} tokens' KV "
              f"({format_bytes(kv.synthesizer_saved_bytes)}) and forwarded "
              f"{kv.synthesizer_prefill_tokens}")
        else:
            p(f"{shared}; not reused ({kv.reuse_note})")
    cons = f"{result.cons_answer} ({result.cons_votes}/{len(e.texts)} votes)"
    p(f"  answers: pass@1={result.pass_at_1_answer}  Cons@{len(e.texts)}={cons}  "
      f"A2R={result.final_answer}")
    if gold is not None:
        grade = result.grade(gold)
        p("  correct: " + "  ".join(f"{k}={v}" for k, v in grade.items()))
    p(f"  total {result.seconds:.2f} s")


def emit_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
