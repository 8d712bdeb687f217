"""``a2r eval --deepconf``: the DeepConf methods (arXiv 2508.15260) from the explorer's paths.

=====================  =========================================================================
``deepconf_offline``   the ``ceil(eta * N)`` paths of highest lowest-group confidence, voting with
                       their lowest group confidence as weight (same N paths as ``cons_at_n``)
``deepconf_online``    a second explorer run with the online stop: ``warmup_paths`` paths in full
                       set the threshold (``percentile`` of their lowest group confidences), the
                       others stop once their group confidence falls below it; the warm-up
                       paths at or above the threshold and the paths that were not stopped vote,
                       weighted by their lowest group confidence. Its tokens are that run's.
``a2r_conf``           the synthesizer over the references of the same ``ceil(eta * N)`` most
                       confident paths, most confident first
=====================  =========================================================================

The online run samples path i with the same noise as the full run (rows of one draw per step,
:func:`a2r.explore.explore`), so its paths are prefixes of the full run's: the two methods see
the same paths, one of them cut short. Confidence is scored from the model's raw next-token
distribution (:mod:`a2r.confidence`); with ``--engine vllm`` from vLLM's returned
log-probabilities, and the online stop is not available there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from ..confidence import (ConfidenceConfig, auroc, lowest_group_confidence,
                          threshold_from_warmup, top_fraction, weighted_vote)
from ..extract import extract_final_answer

__all__ = ["DEEPCONF_METHODS", "DeepConfOptions", "deepconf_methods", "summarize_confidence"]

DEEPCONF_METHODS = ("deepconf_offline", "deepconf_online", "a2r_conf")


@dataclass(frozen=True)
class DeepConfOptions:
    """Settings of the DeepConf methods.

    ``window`` / ``top_k``: :class:`~a2r.confidence.ConfidenceConfig`'s. ``warmup_paths`` (0: no
    ``deepconf_online``) and ``percentile``: the online stop. ``eta``: the fraction of the N
    paths kept by ``deepconf_offline`` and ``a2r_conf``. Defaults for N = 8 short paths: 2
    warm-up paths (a quarter of the budget: DeepConf's 16 of 512 would be less than one path),
    percentile 90 (DeepConf-low), eta 0.5 (4 of 8: the synthesizer was trained on up to 4
    references).
    """

    window: int = 16
    top_k: int = 20
    warmup_paths: int = 2
    percentile: float = 90.0
    eta: float = 0.5

    def __post_init__(self):
        self.tracking()   # checks window, top_k, percentile
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {self.eta!r}")
        if self.warmup_paths < 0:
            raise ValueError(f"warmup_paths must be >= 0, got {self.warmup_paths!r}")

    def tracking(self) -> ConfidenceConfig:
        """Confidence tracking without a stop (the full run)."""
        return ConfidenceConfig(window=self.window, top_k=self.top_k, percentile=self.percentile)

    def online(self) -> ConfidenceConfig:
        """The online stop's configuration."""
        return ConfidenceConfig(window=self.window, top_k=self.top_k,
                                warmup_paths=self.warmup_paths, percentile=self.percentile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deepconf_methods(pipeline, question: str, result, grade: Callable[[str | None], dict],
                     options: DeepConfOptions) -> tuple[dict, dict, dict]:
    """The three methods for one question from ``result`` (:meth:`A2RPipeline.run` with
    ``pipeline.explorer_confidence`` set): ``(methods, stages, info)``: each method's graded
    answer, the stages they ran (:class:`~a2r.pipeline.StageReport`), and what the record keeps
    (per-token confidences, lowest group confidences, the online run's stops)."""
    explorer = result.explorer
    if explorer.confidences is None:
        raise ValueError("the explorer stage has no confidences: set "
                         "pipeline.explorer_confidence before pipeline.run")
    lowest = [lowest_group_confidence(c, options.window) for c in explorer.confidences]
    kept = top_fraction(lowest, options.eta)
    answers = result.explorer_answers
    methods = {"deepconf_offline": grade(weighted_vote([answers[i] for i in kept],
                                                       [lowest[i] for i in kept]))}
    synth = pipeline.answer(pipeline.synthesizer_prompt(question, [result.references[i]
                                                                   for i in kept]),
                            name="synthesizer_conf")
    methods["a2r_conf"] = grade(extract_final_answer(synth.texts[0]))
    stages = {"synthesizer_conf": synth}
    info: dict[str, Any] = {
        "lowest_group_confidence": lowest, "kept": kept,
        "token_confidences": [[round(c, 4) for c in row] for row in explorer.confidences]}
    if options.warmup_paths:
        online = pipeline.explore_with_confidence(question, options.online())
        stages["explorer_online"] = online
        online_lowest = [lowest_group_confidence(c, options.window) for c in online.confidences]
        warmup = options.warmup_paths
        threshold = threshold_from_warmup(online_lowest[:warmup], options.percentile)
        voters = [i for i, reason in enumerate(online.stop_reasons)
                  if (online_lowest[i] >= threshold if i < warmup else reason != "confidence")]
        online_answers = [extract_final_answer(text) for text in online.texts]
        methods["deepconf_online"] = grade(weighted_vote([online_answers[i] for i in voters],
                                                         [online_lowest[i] for i in voters]))
        info["online"] = {"threshold": threshold, "stop_reasons": online.stop_reasons,
                          "path_tokens": [len(ids) for ids in online.token_ids],
                          "lowest_group_confidence": online_lowest, "voters": voters}
    return methods, stages, info


def summarize_confidence(records: Sequence[dict]) -> dict[str, Any]:
    """Does path confidence predict a right answer? AUROC of each path's lowest group
    confidence (and of its mean token confidence) against its correctness, pooled over all
    paths and averaged over the questions that have both right and wrong paths; and the online
    run's stops."""
    rows = [(info["lowest_group_confidence"][i], sum(c) / max(len(c), 1), path["correct"])
            for r in records if (info := r.get("confidence"))
            for i, (path, c) in enumerate(zip(r["paths"], info["token_confidences"]))]
    if not rows:
        return {}
    lowest, mean, correct = zip(*rows)
    per_question = [auroc(info["lowest_group_confidence"], [p["correct"] for p in r["paths"]])
                    for r in records if (info := r.get("confidence"))]
    per_question = [a for a in per_question if a is not None]
    summary: dict[str, Any] = {
        "paths": len(rows), "paths_correct": sum(correct),
        "auroc_lowest_group": auroc(lowest, correct), "auroc_mean_token": auroc(mean, correct),
        "auroc_lowest_group_within_question": (sum(per_question) / len(per_question)
                                               if per_question else None),
        "questions_with_both_classes": len(per_question)}
    online = [r["confidence"]["online"] for r in records if "online" in r.get("confidence", {})]
    if online:
        reasons = [reason for o in online for reason in o["stop_reasons"]]
        summary["online_stop_reasons"] = {k: reasons.count(k) for k in sorted(set(reasons))}
    return summary
