"""The embedded demo models: the synthetic sums task (:mod:`a2r.demo.task`), the tiny models
(:mod:`a2r.demo.tiny`), their training (``python -m a2r.demo.train``) and the trained weights
shipped under ``a2r/demo/trained``."""
