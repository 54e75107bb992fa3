"""Benchmarks: speed, memory, the analytic (roofline) floor and training cost, side by side (``ecm-bench``)."""
