"""The report of ``sparsediff compare``: summary rows, plots, ``results.json``, ``report.md``, ``report.html``.

``results.json`` is strict JSON: non-finite numbers (the PSNR of a video identical to dense is infinite)
are written as ``null``; its ``json_notes`` key says so.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..metrics import strict_json
from .variants import BASELINE, Variant

#: PSNR at or above this (dB) is drawn at the top edge of the scatter plot (off scale), like inf.
PSNR_OFF_SCALE_DB = 60.0
JSON_NOTE = (
    "non-finite numbers are written as null: a PSNR of null next to SSIM 1.0 means identical videos (inf dB)"
)


def _mse_from_psnr(p: Any, data_range: float) -> float | None:
    if p is None:
        return None
    return 0.0 if p == math.inf else data_range**2 * 10 ** (-float(p) / 10)


def _psnr_from_mses(mses: list[float], data_range: float) -> float | None:
    if not mses:
        return None
    m = sum(mses) / len(mses)
    return math.inf if m == 0 else 10 * math.log10(data_range**2 / m)


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(x: Any, nd: int) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}"


def _from_json(x: Any) -> Any:
    if x == "inf":
        return math.inf
    if x == "-inf":
        return -math.inf
    return x


def _environment(device: str) -> dict[str, Any]:
    import diffusers

    from .. import __version__

    env = {
        "sparsediff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    try:
        import torchmetrics

        env["torchmetrics"] = torchmetrics.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["torch_threads"] = torch.get_num_threads()
    env["cpu_count"] = os.cpu_count()
    try:
        from ..kernels import launch as kernels

        env["triton"] = kernels.triton_available()
    except Exception:  # pragma: no cover
        pass
    return env


_DENSE_PLAN = "dense attention (the model's own processors)"


def _variant_row(
    name: str,
    rec: dict[str, Any],
    variants: Sequence[Variant],
    summaries: dict[str, str],
    base_step: float | None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One summary row: plan, densities, timings and (every row but plain dense) metrics pooled over the
    samples. ``info``: ``{"base": plan label or "dense", "cache": cache label or None}`` (``--cache``)."""
    smp = rec["samples"]
    info = info or {"base": name, "cache": None}
    base = info["base"]
    plan = _DENSE_PLAN if base == BASELINE else summaries[base]
    if info["cache"] is not None:
        plan += f"; then the cache {info['cache']} (diffusers)"
    row: dict[str, Any] = {
        "label": name,
        "spec": None if base == BASELINE else next(v.spec for v in variants if v.label == base),
        "plan_label": base,
        "cache": info["cache"],
        "plan": plan,
        "density_per_layer": rec.get("density_per_layer", {}),
        "mean_density": 1.0,
        "run_density": rec.get("run_density", 1.0),
        "s_per_step": _mean([r["s_per_step"] for r in smp]),
        "s_per_step_sd": _std([r["s_per_step"] for r in smp]),
        "total_s": _mean([r["total_s"] for r in smp]),
        "peak_memory_gb": rec.get("peak_memory_gb"),
        "peak_memory_gb_per_rank": rec.get("peak_memory_gb_per_rank"),  # --cp: every rank's peak
        "predicted_speedup": rec.get("predicted_speedup"),
        "search_predicted_speedup": rec.get("search_predicted_speedup"),
        "attention_share": _mean([r["self_attention_s"] / r["denoise_s"] for r in smp if r.get("denoise_s")]),
    }
    dens = [d for comp in row["density_per_layer"].values() for d in comp.values()]
    if base != BASELINE:
        row["mean_density"] = _mean(dens) if dens else 1.0
    row["speedup"] = base_step / row["s_per_step"] if base_step and row["s_per_step"] else None
    if name == BASELINE:
        row.update(psnr=math.inf, ssim=1.0, ms_ssim=None, temporal_psnr=math.inf, lpips=None)
    else:
        ms = [r["metrics"] for r in smp]
        row["psnr"] = _psnr_from_mses([_mse_from_psnr(_from_json(m["psnr"]), 1.0) for m in ms], 1.0)
        row["ssim"] = _mean([m["ssim"] for m in ms])
        row["ms_ssim"] = _mean([m["ms_ssim"] for m in ms])
        tp = [_mse_from_psnr(_from_json(m["temporal_psnr"]), 2.0) for m in ms]
        row["temporal_psnr"] = _psnr_from_mses([t for t in tp if t is not None], 2.0)
        row["lpips"] = _mean([m["lpips"] for m in ms])
    row["samples"] = smp
    return row


def summarise(
    records: dict[str, dict[str, Any]],
    names: list[str],
    variants: Sequence[Variant],
    summaries: dict[str, str],
    *,
    prompts: list[str],
    seeds: list[int],
    settings: Any,
    extra_settings: dict[str, Any],
    model_info: dict[str, Any],
    notes: list[str],
    lpips_reason: str | None,
    command: str | None,
    wall_s: float,
    load: tuple[float | None, float | None] = (None, None),
    rows: dict[str, dict[str, Any]] | None = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``results.json`` content from the per-variant records (dense first). ``rows``: each name's
    plan and cache (``--cache``; default: every row its own plan, no cache); ``cache``: the cache's spec,
    label, config class and configs (written as ``results.json``'s ``cache``; ``None`` without one)."""
    base_step = _mean([r["s_per_step"] for r in records[BASELINE]["samples"]])
    info = rows or {}
    rows = [_variant_row(n, records[n], variants, summaries, base_step, info.get(n)) for n in names]
    if cache is not None:  # what the cache skipped: attention operator calls per generation vs dense
        base_calls = _mean([smp.get("attention_calls") for smp in rows[0]["samples"]])
        for r in rows:
            calls = _mean([smp.get("attention_calls") for smp in r["samples"]])
            r["attention_calls"] = calls
            r["attention_calls_vs_dense"] = calls / base_calls if calls is not None and base_calls else None
    skipped: dict[str, str] = {}
    for r in rows[1:]:
        for smp in r["samples"]:
            skipped.update(smp["metrics"].get("skipped") or {})
    if lpips_reason:
        skipped["lpips"] = lpips_reason
    notes = list(notes) + _timing_notes(rows, settings.device, load)
    for r in rows[1:]:
        if r["plan_label"] == BASELINE:  # dense + cache
            continue
        if r["mean_density"] >= 0.999 and "all heads HeadSpec(dense)" not in r["plan"]:
            notes.append(
                f"{r['label']!r} kept every block at this size (density {r['mean_density']:.2f}): it ran dense "
                "in effect; try a smaller block_size (e.g. ',block_size=16') or a larger video"
            )
    s = settings
    return {
        "format": "sparsediff-compare/1",
        "json_notes": JSON_NOTE,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "model": model_info,
        "environment": _environment(s.device),
        "settings": {
            "prompts": prompts,
            "seeds": seeds,
            "num_frames": s.num_frames,
            "height": s.height,
            "width": s.width,
            "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale,
            "negative_prompt": s.negative_prompt,
            **extra_settings,
        },  # fmt: skip
        "video_shape": _video_shape(records),
        "steps_run": max(
            (smp.get("steps") or 0 for rec in records.values() for smp in rec["samples"]), default=None
        ),
        "metrics_skipped": skipped,
        "notes": notes,
        "wall_s": wall_s,
        "cache": cache,
        "variants": rows,
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def _std(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _timing_notes(
    rows: list[dict[str, Any]], device: str, load: tuple[float | None, float | None]
) -> list[str]:
    """Say when the timings cannot be trusted (busy machine, calls that vary) and what CPU timings mean."""
    notes = []
    ncpu = os.cpu_count() or 1
    busy = [x for x in load if x is not None and x > 0.8 * ncpu]
    if busy:
        notes.append(
            f"the machine was busy (1-minute load average {max(busy):.1f} on {ncpu} CPUs at the start/end of "
            "the run): timings and speedups are unreliable; rerun on an idle machine"
        )
    cvs = [
        (r["s_per_step_sd"] / r["s_per_step"], r["label"])
        for r in rows
        if r.get("s_per_step_sd") is not None and r.get("s_per_step")
    ]
    if cvs and max(cvs)[0] > 0.2:
        cv, label = max(cvs)
        notes.append(
            f"time per step varies by {cv:.0%} (sd / mean) between calls of {label!r}: speedups of less than "
            "about that much are noise"
        )
    if not device.startswith("cuda"):
        notes.append(
            "CPU run: sparse attention runs sparsediff's PyTorch twin, which beats dense only at low density "
            "on long sequences; speed claims need a GPU run (the quality numbers hold on any device)"
        )
    return notes


def _video_shape(records: dict[str, dict[str, Any]]) -> list[int] | None:
    for rec in records.values():
        for smp in rec["samples"]:
            if "metrics" in smp:
                m = smp["metrics"]
                return [m["frames"], m["height"], m["width"]]
    return None


# ---------------------------------------------------------------------------------------------- reports
def _off_scale(psnr: float | None) -> bool:
    return psnr is not None and (not math.isfinite(psnr) or psnr >= PSNR_OFF_SCALE_DB)


def _plot_quality_speed(results: dict[str, Any], path: Path) -> Path:
    """Speed-up (x) vs PSNR (y). The y axis spans the finite, on-scale PSNRs; a variant at PSNR inf
    (identical to dense) or >= ``PSNR_OFF_SCALE_DB`` is drawn as a triangle on the top edge, labelled
    with its value, and a note under the plot says so -- one near-identical variant does not squash
    the others."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in results["variants"] if r["label"] != BASELINE and r.get("psnr") is not None]
    on = [r["psnr"] for r in rows if not _off_scale(r["psnr"])]
    lo, hi = (min(on), max(on)) if on else (PSNR_OFF_SCALE_DB - 20, PSNR_OFF_SCALE_DB - 10)
    span = max(hi - lo, 4.0)
    y_lo, y_top = lo - 0.15 * span, hi + 0.25 * span
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    off = []
    for j, r in enumerate(rows):
        x = r["speedup"] or 0.0
        size = 60 + 240 * (1 - r["mean_density"])
        if _off_scale(r["psnr"]):
            off.append(r)
            value = "inf" if not math.isfinite(r["psnr"]) else f"{r['psnr']:.0f} dB"
            ax.scatter([x], [y_top], s=size, marker="^", color=f"C{j % 10}", clip_on=False, zorder=3)
            ax.annotate(f"{r['label']} (PSNR {value}, off scale)", (x, y_top), textcoords="offset points",
                        xytext=(7, -12), fontsize=8)  # fmt: skip
        else:
            ax.scatter([x], [r["psnr"]], s=size, alpha=0.8, color=f"C{j % 10}")
            ax.annotate(r["label"], (x, r["psnr"]), textcoords="offset points", xytext=(7, 5), fontsize=9)
    ax.set_ylim(y_lo, y_top)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.text(1.0, y_lo, " dense speed", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("speedup vs dense (s/step dense / s/step plan)")
    ax.set_ylabel("PSNR vs dense (dB, higher = closer)")
    ax.set_title("quality vs speed (marker size: sparsity)", fontsize=10)
    ax.grid(alpha=0.3)
    xs = [r["speedup"] or 0.0 for r in rows] + [1.0]
    x0, x1 = min(xs), max(xs)
    ax.set_xlim(x0 - 0.15 * (x1 - x0 + 0.2), x1 + 0.45 * (x1 - x0 + 0.2))
    if off:
        fig.text(0.01, 0.01, f"\u25b2 on the top edge: PSNR inf (identical to dense) or >= {PSNR_OFF_SCALE_DB:.0f} dB, "
                 "off the axis scale", fontsize=7.5, color="dimgrey")  # fmt: skip
    fig.tight_layout(rect=(0, 0.04 if off else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_density(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in results["variants"] if r.get("plan_label", r["label"]) != BASELINE]  # sparse rows
    colours = [f"C{j % 10}" for j in range(len(rows))]
    comps = sorted({c for r in rows for c in r["density_per_layer"]}) or ["transformer"]
    fig, axes = plt.subplots(len(comps), 1, figsize=(7.0, 2.8 * len(comps) + 0.6), dpi=110, squeeze=False)
    for ax, comp in zip(axes[:, 0], comps):
        n = 1 + max(
            (int(k) for r in rows for k in r["density_per_layer"].get(comp, {})),
            default=0,
        )
        width = 0.8 / max(1, len(rows))
        for j, r in enumerate(rows):
            d = r["density_per_layer"].get(comp, {})
            ys = [d.get(str(i), 1.0) for i in range(n)]
            xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
            bars = ax.bar(xs, ys, width=width * 0.95, color=colours[j])
            for i, b in enumerate(bars):
                if str(i) not in d:
                    b.set_alpha(0.25)
                    b.set_hatch("//")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(range(n))
        ax.set_xlabel(f"{comp}: self-attention layer")
        ax.set_ylabel("density")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(
        "fraction of attention blocks computed per layer (hatched: dense layer)", fontsize=10
    )
    axes[-1, 0].legend(
        handles=[Patch(color=c, label=r["label"]) for c, r in zip(colours, rows)],
        fontsize=8,
        ncol=min(3, len(rows)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.3),
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


_COLUMNS = (
    ("plan", "label", None),
    ("density (sparse layers)", "mean_density", 3),
    ("run density", "run_density", 3),
    ("s / step", "s_per_step", 3),
    ("speedup", "speedup", 2),
    ("attention calls vs dense", "attention_calls_vs_dense", 2),
    ("predicted speedup", "predicted_speedup", 2),
    ("search's prediction", "search_predicted_speedup", 2),
    ("total s", "total_s", 2),
    ("PSNR dB", "psnr", 2),
    ("SSIM", "ssim", 4),
    ("MS-SSIM", "ms_ssim", 4),
    ("temporal PSNR dB", "temporal_psnr", 2),
    ("LPIPS", "lpips", 4),
    ("peak mem GB", "peak_memory_gb", 2),
)


def _cell(row: dict[str, Any], key: str, nd: int | None) -> str:
    v = row.get(key)
    if nd is None:
        return str(v)
    if key in ("speedup", "predicted_speedup", "search_predicted_speedup") and v is not None:
        return f"{v:.2f}x"
    if key == "s_per_step" and v is not None and row.get("s_per_step_sd"):
        return f"{v:.3f} ± {row['s_per_step_sd']:.3f}"
    return _fmt(v, nd)


def _cp_note(cp: dict[str, int] | None) -> str:
    """`` (context parallel: Ulysses U x ring R; ...)`` under ``--cp``, else empty."""
    if not cp:
        return ""
    return (
        f" (context parallel: Ulysses {cp['ulysses']} x ring {cp['ring']}; peak mem GB is the largest rank's)"
    )


def _conditions(results: dict[str, Any]) -> list[str]:
    st, env, mdl = results["settings"], results["environment"], results["model"]
    shape = results.get("video_shape")
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('torch_threads')} torch threads)"
    return [
        f"Model: {mdl.get('source', '')} -- {mdl.get('class', '')}",
        f"Video: {'x'.join(map(str, shape)) + ' (frames x H x W)' if shape else 'n/a'}; steps "
        f"{st['num_inference_steps'] or str(results.get('steps_run')) + ' (pipeline default)'}; guidance {st['guidance_scale'] or 'pipeline default'}; "
        f"{len(st['prompts'])} prompt(s) x seeds {st['seeds']}",
        f"Device: {dev}; sparsediff {env['sparsediff']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"torchmetrics {env.get('torchmetrics')}; backend {st['backend']}; block size "
        f"{st['block_size'] or 'default (64)'}; warm-up calls per variant {st['warmup']}; processes "
        f"{st['processes']}" + _cp_note(st.get("context_parallel")),
        f"Command: {results.get('command') or '(library call)'}",
        f"Date: {results['date']}; wall time {results['wall_s']:.1f} s",
    ]


_EXPLAIN = [
    "All metrics compare each plan's video with the dense video of the same prompt and seed.",
    "PSNR: pooled over frames and samples (inf = identical). SSIM / MS-SSIM: mean over frames. "
    "Temporal PSNR: PSNR of frame differences (low = flicker or different motion).",
    "s / step: from the first transformer call to the last step's end, over the steps (every step, the "
    "warm-up ones included; prompt encoding and decoding excluded), without the warm-up calls. Predicted "
    "speedup: the plan replayed on this device (sparsediff.search.price) with the self-attention share of "
    "the dense runs; the search's prediction: what the search wrote into a searched plan. "
    "Density: fraction of attention blocks computed in the layers that ran sparse (first sparse call); "
    "run density also counts dense warm-up steps and dense layers as 1.",
]


def _explain(results: dict[str, Any]) -> list[str]:
    if not results.get("cache"):
        return _EXPLAIN
    return _EXPLAIN + [
        f"Cache: {results['cache']['config_class']} ({results['cache']['spec']}), diffusers' enable_cache, "
        "reset before every generation. 'X + cache' rows run X with the cache on top; every row's speedup and "
        "metrics are against plain dense (no cache). Attention calls vs dense: attention operator calls "
        "(self and cross) per generation relative to plain dense -- what the cache skipped. No predicted "
        "speedup for cache rows (the price model knows nothing of the cache)."
    ]


def _columns(results: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """The table columns, without those that no variant has a value for (their reason is listed)."""
    rows = results["variants"]
    return [c for c in _COLUMNS if c[2] is None or any(r.get(c[1]) is not None for r in rows)]


def write_json(path: Path, results: dict[str, Any]) -> Path:
    """``results.json``: strict JSON (non-finite numbers as null, see ``json_notes``)."""
    path.write_text(json.dumps(strict_json(results), indent=1, allow_nan=False) + "\n")
    return path


def write_reports(out: Path, results: dict[str, Any], pairs: list[tuple[int, int]]) -> None:
    """Plots, ``results.json``, ``report.md`` and the self-contained ``report.html`` into ``out``."""
    qs = _plot_quality_speed(results, out / "quality_speed.png")
    dp = _plot_density(results, out / "density.png")
    strips = [f"strips/p{pi}_s{seed}.png" for pi, seed in pairs]
    write_json(out / "results.json", results)
    (out / "report.md").write_text(_markdown(results, qs, dp, strips))
    (out / "report.html").write_text(_html(out, results, qs, dp, strips), encoding="utf-8")


def _markdown(results: dict[str, Any], qs: Path, dp: Path, strips: list[str]) -> str:
    cols = _columns(results)
    md = ["# sparsediff compare: dense vs sparse, same prompts and seeds", ""]
    md += [f"- {c}" for c in _conditions(results)] + [""]
    md += ["| " + " | ".join(c for c, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in results["variants"]:
        md.append("| " + " | ".join(_cell(r, k, nd) for _, k, nd in cols) + " |")
    if results["notes"]:
        md += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    md += [""] + _explain(results) + [""]
    md += [f"- `{r['label']}`: {r['plan']}" for r in results["variants"]]
    if results["metrics_skipped"]:
        md += ["", "Not computed:"] + [f"- {k}: {v}" for k, v in results["metrics_skipped"].items()]
    md += ["", f"![quality vs speed]({qs.name})", "", f"![density per layer]({dp.name})", ""]
    md += [f"![{s}]({s})" for s in strips] + [""]
    return "\n".join(md)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_rows(results: dict[str, Any]) -> tuple[str, str, str]:
    """(header cells, summary rows, per-sample rows) of the HTML tables."""
    e = html.escape
    cols = _columns(results)
    head = "".join(f"<th>{e(c)}</th>" for c, _, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_cell(r, k, nd))}</td>" for _, k, nd in cols) + "</tr>"
        for r in results["variants"]
    )
    per = []
    for r in results["variants"][1:]:
        for smp in r["samples"]:
            m = smp["metrics"]
            per.append(
                f"<tr><td>{e(r['label'])}</td><td>{smp['prompt_index']}</td><td>{smp['seed']}</td>"
                f"<td>{e(_fmt(_from_json(m['psnr']), 2))}</td><td>{e(_fmt(m['ssim'], 4))}</td>"
                f"<td>{e(_fmt(_from_json(m['temporal_psnr']), 2))}</td>"
                f"<td>{e(_fmt(smp['s_per_step'], 3))}</td>"
                f'<td><a href="{e(smp.get("video", ""))}">{e(smp.get("video", ""))}</a></td></tr>'
            )
    return head, body, "".join(per)


_CSS = """body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tr:first-child td { background: #fafafa; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plots img, figure img { border: 1px solid #ddd; max-width: 100%; }
figure { margin: 0 0 16px; } figcaption { font-size: 12px; color: #666; }
.small { font-size: 13px; color: #444; } code { background: #f4f4f4; padding: 0 3px; }"""


def _html(out: Path, results: dict[str, Any], qs: Path, dp: Path, strips: list[str]) -> str:
    e = html.escape
    head, body, per = _html_rows(results)
    plans = "".join(f"<li><code>{e(r['label'])}</code>: {e(r['plan'])}</li>" for r in results["variants"])
    skipped = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in results["metrics_skipped"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in results["notes"])
    prompts = "".join(f"<li>{i}: {e(q)}</li>" for i, q in enumerate(results["settings"]["prompts"]))
    strip_html = "".join(
        f"<figure>{_img(out / s, s)}<figcaption>{e(s)}</figcaption></figure>" for s in strips
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>sparsediff compare</title>
<style>
{_CSS}
</style></head><body>
<h1>sparsediff compare</h1>
<p class="small">{"<br>".join(e(c) for c in _conditions(results))}</p>
<h2>Summary (mean over {len(results["settings"]["prompts"])} prompt(s) x {len(results["settings"]["seeds"])} seed(s))</h2>
<table><tr>{head}</tr>{body}</table>
<p class="small">{"<br>".join(e(x) for x in _explain(results))}</p>
{"<h3>Notes</h3><ul class='small'>" + notes + "</ul>" if notes else ""}
<div class="plots">{_img(qs, "quality vs speed")}{_img(dp, "density per layer")}</div>
<h2>Plans</h2><ul class="small">{plans}</ul>
{"<h2>Not computed</h2><ul class='small'>" + skipped + "</ul>" if skipped else ""}
<h2>Side by side (dense first; evenly spaced frames)</h2>
<ol class="small" start="0">{prompts}</ol>
{strip_html}
<h2>Per sample</h2>
<table><tr><th>plan</th><th>prompt</th><th>seed</th><th>PSNR dB</th><th>SSIM</th><th>temporal PSNR dB</th>
<th>s / step</th><th>video</th></tr>{per}</table>
<p class="small">All numbers: <a href="results.json">results.json</a>.</p>
</body></html>
"""
    return page
