"""Planted-structure checks of the search (used by tests and ``samples/search_planted.py``).

:func:`structure_matches` says whether a chosen spec has the structure a planted head kind
(:mod:`sparsediff.testing`) was built with:

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
from ..patterns.common import cdiv
from ..patterns.tile import default_tile
from ..specs import HeadSpec

__all__ = ["structure_matches"]

_POSITION_MAJOR = ("frame", "hwf", "whf")


def structure_matches(kind: str, spec: HeadSpec, layout: TokenLayout, block_size: int) -> bool:
    p = spec.pattern
    if kind == "local":
        return p in ("tile", "radial") or (
            p == "reordered" and spec.get("order") != "cluster" and spec.get("select") == "static"
        )
    if kind == "temporal":
        if p == "reordered":
            return spec.get("order") in _POSITION_MAJOR
        if p == "tile":
            tile = spec.get("tile") or default_tile(layout.grid, block_size)
            return 2 * (int(spec.get("window")[0]) // 2) + 1 >= cdiv(layout.grid[0], tile[0])
        return False
    if kind == "cluster":
        return p == "reordered" and spec.get("order") == "cluster"
    if kind == "stripe":
        return p in ("topp", "lse_cache") or (p == "reordered" and spec.get("order") == "cluster")
    if kind == "global":
        return p == "dense"
    raise ValueError(f"unknown planted kind {kind!r}")
