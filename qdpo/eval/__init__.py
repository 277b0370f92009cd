"""Evaluation against the full-precision model: flip rate, agreement, KL, report.

* :mod:`qdpo.eval.metrics`: ``fp_targets`` / ``flip_rate`` (cheap validation metric),
  ``teacher_forced`` (flip rate, top-1 agreement, KL, PPL, Δp RMS), ``generation_metrics``
  (first divergence, exact match, ROUGE-L, FP-as-judge NLL);
* :mod:`qdpo.eval.plots`: flip-vs-margin and training-curve PNGs;
* :mod:`qdpo.eval.report`: ``metrics.json`` (stable schema) and ``report.md``.
"""
