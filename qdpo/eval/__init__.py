"""Evaluation against the full-precision model: flip rate, agreement, KL, report."""
