"""``a2r eval``: accuracy of A2R and its baselines on a JSONL file (:mod:`a2r.eval.evaluate`),
answers graded by Math-Verify in a worker process (:mod:`a2r.eval.grading`)."""
