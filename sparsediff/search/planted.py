"""Planted-structure checks of the search (used by tests and ``samples/search_planted.py``).

:func:`structure_matches` says whether a chosen spec has the structure a planted head kind
(:mod:`sparsediff.testing`) was built with. Each family declares its own rule (``planted=`` of its
registration, in ``sparsediff/patterns/<name>.py``); a family without one matches no kind. The built-in
rules:

* ``local`` (3D Gaussian window): ``tile``, ``radial``, or a static band on a grid order
  (``reordered`` static -- consecutive positions of any axis order are spatio-temporal neighbours);
* ``temporal`` (same position across frames): ``reordered`` on a position-major order (``frame``,
  ``hwf``, ``whf``), or a ``tile`` window spanning every frame;
* ``cluster``: ``reordered`` with ``order="cluster"``;
* ``stripe`` (sink key columns): the dynamic selections that find columns -- ``topp``, ``lse_cache``
  and cluster top-p (k-means puts the sinks in one key cluster);
* ``global`` (diffuse): ``dense``.

``lse_cache`` is data-adaptive and can serve every kind; it counts as a match only for ``stripe``.
"""

from __future__ import annotations

from ..layout import TokenLayout
from ..patterns.registry import get_family
from ..specs import HeadSpec
from ..testing import PLANTED_KINDS

__all__ = ["structure_matches"]


def structure_matches(kind: str, spec: HeadSpec, layout: TokenLayout, block_size: int) -> bool:
    """Whether ``spec`` has the structure of planted heads of ``kind`` (one of
    :data:`sparsediff.testing.PLANTED_KINDS`), by its family's ``planted`` rule."""
    if kind not in PLANTED_KINDS:
        raise ValueError(f"unknown planted kind {kind!r}")
    rule = get_family(spec.pattern).planted
    return bool(rule(kind, spec, layout, block_size)) if rule is not None else False
