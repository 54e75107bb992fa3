"""The random-weight d16-proportioned model the benchmarks measure beside the embedded default.

It lives in the package (``ecm.random_models``), where ``ecm-bench`` and the tests' fixtures use it too.
"""

from __future__ import annotations

from ecm.random_models import d16_proportioned

__all__ = ["d16_proportioned"]
