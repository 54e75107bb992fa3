"""Evaluation: control fidelity of ECM against the backbone alone (``ecm-eval``)."""
