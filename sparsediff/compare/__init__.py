"""``sparsediff compare``: the same prompts and seeds, dense vs each plan, numbers and pictures side by side.

What a user runs to decide whether to trust a plan. One pipeline is loaded once and reused for every
variant; the dense baseline runs once per (prompt, seed), each plan once per (prompt, seed) too::

    sparsediff compare --prompts samples/prompts_embedded.txt --plans default radial tile --out cmp
    sparsediff compare --model ./my-wan-folder --prompts samples/prompts_video.txt --seeds 0 1 \\
        --plans plans/wan.json "radial,dense_steps=0.25,radial.decay=0.5" --steps 30 --out cmp
    python -m sparsediff.compare ...                                        # the same
    accelerate launch --num_processes 2 -m sparsediff.compare ...           # (prompt, seed) pairs split

Pipeline (:mod:`sparsediff.loading`): the default -- the embedded trained tiny video model when its
weights are in the package, else its random-init twin (wiring only, a warning says so); ``--model
ID_OR_FOLDER``; ``--pipeline MODULE:FUNCTION``. Prompts: ``--prompts FILE`` and/or ``--prompt TEXT``; with
the default model and neither given, 4 of its evaluation captions.

Plans (``--plans``, each one variant; see :func:`parse_variant`)::

    default                      the model family's training-free default plan
    radial | tile | topp | ...   that pattern on every head, with the family's warm-up schedule
    path/to/plan.json            a saved (searched) plan
    dense                        every head dense (a sanity check: must equal the baseline, PSNR = inf)
    radial,dense_steps=0,block_size=32,radial.decay=0.5,label=r-fast
                                 any of the above plus SparseAttentionConfig overrides
    plan.json,remainder=cached,remainder_refresh=5,remainder_layers=[0, 1]
                                 a plan file with Plan.with_remainder applied (the file is not edited)

Outputs in ``--out`` (existing ones are never replaced without ``--overwrite``): ``videos/``, ``strips/``,
``report.html`` (self-contained), ``report.md``, ``results.json`` (strict JSON: non-finite numbers as
null), ``quality_speed.png``, ``density.png``.

``--cache NAME[:field=value,...]`` (:mod:`.cache`) adds one of diffusers' caches: the rows become dense,
``dense + CACHE``, then each plan and ``PLAN + CACHE``, all against plain dense.

The package: :mod:`.variants` (which variants, input checks), :mod:`.cache` (the ``--cache`` spec), :mod:`.run` (generation and timing),
:mod:`.report` (tables, plots, JSON, reports), :mod:`.cli` (the command line).
"""

from __future__ import annotations

from ..media import save_strip
from .cache import CACHE_CONFIGS, CacheSpec, parse_cache
from .cli import build_parser, load_pipeline, main
from .report import strict_json
from .run import compare
from .variants import (
    BASELINE,
    OUTPUT_DIRS,
    OUTPUT_FILES,
    CompareError,
    Variant,
    check_output_dir,
    parse_variant,
    read_prompts,
    unique_labels,  # noqa: F401  (tests and older callers)
)

__all__ = [
    "CACHE_CONFIGS",
    "CacheSpec",
    "parse_cache",
    "CompareError",
    "Variant",
    "parse_variant",
    "read_prompts",
    "load_pipeline",
    "compare",
    "main",
    "build_parser",
    "check_output_dir",
    "save_strip",
    "strict_json",
    "BASELINE",
    "OUTPUT_FILES",
    "OUTPUT_DIRS",
]
