"""Which variants ``sparsediff compare`` runs, and every check of its inputs made before generating.

:func:`parse_variant` (one ``--plans`` entry), :func:`read_prompts`, :func:`check_output_dir`, the plan
preflight (each variant enabled and disabled once on the pipeline) and the vocabulary warnings.
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..cli_args import InputError, read_prompts_file

#: Files and folders ``compare`` writes into ``--out`` (all refused when present, unless overwriting).
OUTPUT_FILES = ("report.html", "report.md", "results.json", "quality_speed.png", "density.png")
OUTPUT_DIRS = ("videos", "strips")
BASELINE = "dense"


class CompareError(InputError):
    """Bad input to ``compare``, found before any generation (the message says what and how to fix it)."""


@dataclass(frozen=True)
class Variant:
    """One sparse configuration to compare with dense.

    Attributes:
        label: short unique name (tables, file names).
        plan: ``None`` (the family default), a pattern name, or a plan JSON path -- what
            :func:`sparsediff.enable_sparse_attention` takes.
        overrides: :class:`~sparsediff.SparseAttentionConfig` fields for this variant.
        spec: the text it was parsed from.
        remainder: ``None``, or ``(remainder, refresh, layers)`` for
            :meth:`~sparsediff.Plan.with_remainder` applied to the plan file (``remainder=cached,
            remainder_refresh=5,remainder_layers=[0, 1]`` in ``--plans``).
    """

    label: str
    plan: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    spec: str = ""
    remainder: tuple[str, int | None, tuple[int, ...] | None] | None = None

    def target(self) -> Any:
        """What :func:`sparsediff.enable_sparse_attention` gets: :attr:`plan`, or the plan file loaded and
        edited by :attr:`remainder`."""
        if self.remainder is None:
            return self.plan
        from ..plan import Plan

        remainder, refresh, layers = self.remainder
        return Plan.load(self.plan).with_remainder(remainder, refresh, layers=layers)


#: ``--plans`` keys that edit the plan file's remainder (:meth:`~sparsediff.Plan.with_remainder`), not config.
REMAINDER_KEYS = ("remainder", "remainder_refresh", "remainder_layers")


def split_top(text: str) -> list[str]:
    """Split on commas outside brackets / braces / parentheses / quotes."""
    parts, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def literal_value(text: str, *, keep_text: bool = True) -> Any:
    """A command-line value: a Python literal, ``true``/``false``/``none``/``null`` in any case, else the
    text itself (``keep_text``) or the literal parser's error."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        if keep_text:
            return text
        raise


def label_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")[:60] or "plan"


def parse_variant(spec: str) -> Variant:
    """Parse one ``--plans`` entry: ``PLAN[,key=value,...]`` or only ``key=value,...`` (default plan).

    ``PLAN`` is ``default``, a pattern name or a plan JSON path. ``key`` is a
    :class:`~sparsediff.SparseAttentionConfig` field (``dense_steps=0.25``, ``dense_layers=[0]``,
    ``block_size=32``, ``min_tokens=0``, ``backend=reference``), ``PATTERN.PARAM`` (``radial.decay=0.5``,
    written into ``pattern_params``), ``remainder`` / ``remainder_refresh`` / ``remainder_layers`` (a plan
    file only: :meth:`~sparsediff.Plan.with_remainder` applied when the variant is enabled, see
    :meth:`Variant.target`) or ``label`` (the variant's name). Values are Python literals (falling
    back to the text). Raises :class:`CompareError` for an unknown pattern, a missing plan file or an
    invalid override.
    """
    from ..config import SparseAttentionConfig
    from ..plan import Plan, PlanError
    from ..specs import PATTERN_PARAMS

    tokens = split_top(spec)
    if not tokens:
        raise CompareError("empty --plans entry")
    plan: str | None
    if "=" in tokens[0]:
        plan, rest = None, tokens
    else:
        plan, rest = tokens[0], tokens[1:]
    label = None
    overrides: dict[str, Any] = {}
    pattern_params: dict[str, dict[str, Any]] = {}
    for tok in rest:
        if "=" not in tok:
            raise CompareError(
                f"--plans {spec!r}: {tok!r} is not key=value (only the first item names a plan)"
            )
        key, val = (s.strip() for s in tok.split("=", 1))
        if key == "label":
            label = val
        elif "." in key:
            pat, param = key.split(".", 1)
            pattern_params.setdefault(pat, {})[param] = literal_value(val)
        else:
            overrides[key] = literal_value(val)
    if pattern_params:
        overrides["pattern_params"] = pattern_params
    edit = {k: overrides.pop(k) for k in REMAINDER_KEYS if k in overrides}
    try:
        SparseAttentionConfig().updated(**overrides)
    except (TypeError, ValueError) as e:
        raise CompareError(f"--plans {spec!r}: {e}") from None

    if plan in (None, "default"):
        plan, base = None, "default"
    elif plan in PATTERN_PARAMS:
        base = plan
    elif Path(plan).is_dir():  # a plan folder (sparsediff finetune): its plan + its LoRA adapter
        from ..plan import plan_folder_files

        try:
            plan_file, weights = plan_folder_files(plan)
            Plan.load(plan_file)
        except (PlanError, OSError, ValueError) as e:
            raise CompareError(f"--plans {spec!r}: {e}") from None
        base = Path(plan).name if weights is None or "lora" in Path(plan).name else Path(plan).name + "+lora"
    else:
        path = Path(plan)
        if not path.is_file():
            hint = f"pattern names: {', '.join(('default', *PATTERN_PARAMS))}"
            if path.suffix.lower() == ".json" or path.parent != Path("."):
                raise CompareError(f"--plans {spec!r}: plan file not found: {path} ({hint})")
            raise CompareError(
                f"--plans {spec!r}: {plan!r} is neither a pattern name nor a plan file ({hint})"
            )
        try:
            Plan.load(path)
        except (PlanError, OSError, ValueError) as e:
            raise CompareError(f"--plans {spec!r}: {e}") from None
        base = path.stem
    remainder = _remainder_edit(spec, plan, edit) if edit else None
    if label is None:
        label = base + ("" if not rest else "+" + ",".join(t for t in rest if not t.startswith("label=")))
    return Variant(label=label, plan=plan, overrides=overrides, spec=spec, remainder=remainder)


def _remainder_edit(
    spec: str, plan: str | None, edit: dict[str, Any]
) -> tuple[str, int | None, tuple[int, ...] | None]:
    """``remainder=...,remainder_refresh=...,remainder_layers=[...]`` of a ``--plans`` entry, checked on the
    plan file it edits (a per-head plan: the layers must exist)."""
    from ..plan import Plan
    from ..specs import PATTERN_PARAMS

    if plan is None or plan in PATTERN_PARAMS or Path(plan).is_dir():
        raise CompareError(
            f"--plans {spec!r}: {'/'.join(edit)} edit the remainder of a plan file (Plan.with_remainder); for "
            "a pattern use PATTERN.remainder=cached; a plan folder keeps the plan its adapter was trained for"
        )
    if "remainder" not in edit:
        raise CompareError(f"--plans {spec!r}: {', '.join(edit)} need remainder=none|pooled|cached")
    refresh, layers = edit.get("remainder_refresh"), edit.get("remainder_layers")
    if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int)):
        raise CompareError(f"--plans {spec!r}: remainder_refresh must be an int, got {refresh!r}")
    if layers is not None:
        layers = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(layers, (list, tuple)):
            raise CompareError(
                f"--plans {spec!r}: remainder_layers must be a list of layer indices, e.g. [0, 1]"
            )
        layers = tuple(layers)
    out = (str(edit["remainder"]), refresh, layers)
    try:
        Plan.load(plan).with_remainder(*out[:2], layers=out[2])
    except ValueError as e:
        raise CompareError(f"--plans {spec!r}: {e}") from None
    return out


def unique_labels(variants: Sequence[Variant]) -> list[Variant]:
    out, seen = [], {BASELINE}
    for v in variants:
        label = v.label if v.label != BASELINE else "dense-plan"
        slug = label_slug(label)
        if slug in {label_slug(s) for s in seen}:
            raise CompareError(
                f"two --plans entries share the name {label!r}; give one a label=NAME ({v.spec!r})"
            )
        seen.add(label)
        out.append(replace(v, label=label))
    return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        return read_prompts_file(path)
    except InputError as e:
        raise CompareError(str(e)) from None


def check_output_dir(out: Path, overwrite: bool, *, create: bool = True) -> list[Path]:
    """Refuse existing outputs (unless ``overwrite``) and an unwritable folder; returns the outputs to
    replace. Creates ``out`` when missing (``create=False``: checks that it could be, writes nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"output folder {out} is not writable: it is a file")
    existing = [out / n for n in OUTPUT_FILES if (out / n).exists()]
    existing += [out / d for d in OUTPUT_DIRS if (out / d).exists() and any((out / d).iterdir())]
    if existing and not overwrite:
        raise CompareError(
            f"{out} already holds {', '.join(p.name for p in existing)}; pass --overwrite to replace "
            "them or choose another --out"
        )
    if not create and not out.exists():
        probe = out.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise CompareError(f"output folder {out} is not writable: {probe} is not a writable folder")
        return existing
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CompareError(f"output folder {out} is not writable: {e.strerror or e}") from None
    return existing


def preflight_plans(pipe: Any, variants: Sequence[Variant], base_config: Any) -> dict[str, str]:
    """Enable and disable every variant once (validates plan vs model, overrides); returns summaries."""
    from ..api import enable_sparse_attention
    from ..pipelines.base import UnsupportedModelError
    from ..plan import PlanError

    summaries = {}
    for v in variants:
        try:
            h = enable_sparse_attention(pipe, v.target(), config=base_config.updated(**v.overrides))
        except (PlanError, UnsupportedModelError, ValueError, TypeError, FileNotFoundError) as e:
            raise CompareError(f"--plans {v.spec!r} cannot run on this pipeline: {e}") from None
        summaries[v.label] = "; ".join(f"{n}: {p.summary()}" for n, p in h.plans.items())
        h.disable()
    return summaries


def vocabulary_warnings(pipe: Any, prompts: Sequence[str]) -> list[str]:
    tok = getattr(pipe, "tokenizer", None)
    vocab = getattr(tok, "token_to_id", None)
    if not isinstance(vocab, dict):
        return []
    unknown = sorted({w for q in prompts for w in q.lower().split() if w not in vocab})
    if not unknown:
        return []
    return [f"words outside the model's vocabulary (read as <unk>): {', '.join(unknown)}"]


def remove_outputs(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir():
            for q in p.iterdir():
                if q.is_file() and q.suffix.lower() in (".mp4", ".gif", ".png"):
                    q.unlink()
        elif p.is_file():
            p.unlink()
