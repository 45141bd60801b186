"""Model card (``MODEL_CARD.md``) of the embedded model, written by the training script from measured numbers.

Nothing in the card is typed by hand: every number comes from the ``metrics`` dict the training script
fills (training config, loss curve summary, checks, probe table, timings). Missing entries are written as
"not measured", never guessed.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["render_model_card"]

_NA = "not measured"


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return _NA
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def render_model_card(metrics: dict[str, Any]) -> str:
    """Markdown text of the model card from the training script's ``metrics`` dict.

    Expected keys (all optional): ``config`` (training config dict), ``num_parameters``, ``size_mb``,
    ``train`` (steps, minutes, device, final_loss, tokens_per_sample), ``checks`` (CheckSummary.to_dict()),
    ``probe`` ({"table": markdown, "counts": {...}, "grid": [...]}), ``timing`` (list of {device, shape,
    steps, guidance, seconds}), ``grid_png`` (file name of the sample grid).
    """
    cfg = metrics.get("config", {})
    model = cfg.get("model", {})
    train = metrics.get("train", {})
    checks = metrics.get("checks")
    probe = metrics.get("probe")
    lines = [
        "# sparsediff embedded model",
        "",
        "A tiny text-to-video Diffusion Transformer (diffusers `WanTransformer3DModel`, pixel space) trained from",
        "scratch on sparsediff's procedural dataset (coloured shapes moving in a prompted direction,",
        "`sparsediff/embedded/data.py`). It exists so that the demo, the samples and the search tests have a model",
        "with *learned* attention on machines where no real model can be downloaded. It is not a general video",
        "model: it only knows captions of the form `a red circle moving left [slowly|quickly]`.",
        "",
        "## Architecture",
        "",
        f"- transformer: {model.get('num_layers', '?')} layers, {model.get('num_heads', '?')} heads x "
        f"{model.get('head_dim', '?')} dims, FFN {model.get('ffn_dim', '?')}, patch {model.get('patch_size', '?')}, "
        f"3 pixel channels out, 3 + {model.get('coord_channels', 0)} in (pixels + fixed t/y/x coordinate ramps)",
        f"- text encoder: word-level tokenizer + {model.get('text_layers', '?')}-layer transformer, width "
        f"{model.get('text_dim', '?')}, fixed orthogonal per-word codes added with weight "
        f"{model.get('token_code_scale', 0.0)}",
        f"- scheduler: FlowMatchEulerDiscreteScheduler, shift {model.get('shift', '?')}",
        f"- parameters: {_fmt(metrics.get('num_parameters'), ',')} ({_fmt(metrics.get('size_mb'), '.2f')} MB as fp16 "
        "safetensors)",
        f"- default sample size: {model.get('sample_num_frames', '?')} frames x {model.get('sample_height', '?')} x "
        f"{model.get('sample_width', '?')} px",
        "",
        "## Training",
        "",
        f"- preset `{cfg.get('preset', '?')}`, {_fmt(train.get('steps'))} steps at batch {cfg.get('batch_size', '?')}, "
        f"{_fmt(train.get('minutes'), '.1f')} min on {train.get('device', _NA)}",
        f"- resolutions (frames, height, width): {cfg.get('resolutions', '?')} with weights "
        f"{cfg.get('resolution_weights', '?')}; {_fmt(train.get('tokens_per_sample'))} tokens per sample at the "
        "largest",
        f"- lr {cfg.get('lr', '?')} (warm-up {cfg.get('warmup_steps', '?')}, cosine), AdamW, EMA "
        f"{cfg.get('ema_decay', '?')}, caption dropout {cfg.get('caption_dropout', '?')}, seed {cfg.get('seed', '?')}",
        f"- final training loss (mean of the last 50 steps): {_fmt(train.get('final_loss'), '.4f')}",
        "- reproduce: `"
        + train.get("command", "python -m sparsediff.embedded.train --preset gpu --out runs/embedded")
        + "`",
        "",
    ]
    if metrics.get("history"):
        lines += ["- history: " + str(metrics["history"])]
    lines += [
        "",
        "## Samples",
        "",
    ]
    if metrics.get("grid_png"):
        lines += [f"![samples]({metrics['grid_png']})", ""]
    else:
        lines += [_NA, ""]
    lines += ["## Automatic checks", ""]
    if checks:
        lines += [
            "Centroid motion of the pixels of the prompted colour vs the prompted direction, and dominant palette",
            "colour vs the prompted colour (`sparsediff/embedded/checks.py`). Issue bar: direction >= 70 %, "
            "colour >= 90 %.",
            "",
            f"- colour right: **{checks['colour_rate']:.0%}**, direction right: **{checks['direction_rate']:.0%}** "
            f"({len(checks['results'])} prompts, {metrics.get('check_setting', '')})",
            "",
            "| prompt | detected colour | colour ok | displacement (dx, dy) | direction ok |",
            "|---|---|---|---|---|",
        ]
        for r in checks["results"]:
            d = r["displacement"]
            ds = _NA if d is None else f"({d[0]:+.2f}, {d[1]:+.2f})"
            lines.append(
                f"| {r['prompt']} | {r['detected_colour']} | {'yes' if r['colour_ok'] else 'no'} | {ds} | "
                f"{'yes' if r['direction_ok'] else 'no'} |"
            )
        lines.append("")
    else:
        lines += [_NA, ""]
    held = metrics.get("heldout_checks")
    lines += ["## Held-out check", ""]
    if held:
        lines += [
            f"Same check on other prompts (`data.heldout_prompts`) and seeds no training or trainer check uses "
            f"({metrics.get('heldout_setting', '')}): colour right **{held['colour_rate']:.0%}**, direction right "
            f"**{held['direction_rate']:.0%}** ({len(held['results'])} prompts).",
            "",
        ]
        by_size = metrics.get("heldout_by_size") or {}
        if by_size:
            lines += ["| size (frames x height x width) | colour right | direction right |", "|---|---|---|"]
            lines += [
                f"| {size} | {r['colour_rate']:.0%} | {r['direction_rate']:.0%} |"
                for size, r in by_size.items()
            ]
            lines.append("")
    else:
        lines += [_NA, ""]
    lines += ["## Attention structure (probe)", ""]
    if probe:
        lines += [
            f"`sparsediff/embedded/probe.py` on token grid {probe.get('grid')} ({probe.get('setting', '')}). "
            f"Head kinds: {json.dumps(probe.get('counts', {}))}. Issue bar: several heads with >= 5x uniform mass",
            "in the nearest 3x3x3 neighbourhood, and at least one temporal or diffuse head.",
            "",
            probe.get("table", ""),
            "",
        ]
    else:
        lines += [_NA, ""]
    lines += ["## Sampling time", ""]
    timing = metrics.get("timing") or []
    if timing:
        lines += [
            "| device | threads | frames x H x W | steps | CFG | seconds |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for t in timing:
            lines.append(
                f"| {t['device']} | {t.get('threads', '')} | {t['shape']} | {t['steps']} | {t['guidance']} | "
                f"{t['seconds']:.2f} |"
            )
        lines.append("")
    else:
        lines += [_NA, ""]
    lines += [
        "## Limitations",
        "",
        "Closed vocabulary (unknown words map to `<unk>`), black background, at most two grey distractors, no",
        "occlusion of the main object, four directions. Learned attention here is a stand-in for the structure of",
        "large video DiTs, not a measurement of them.",
        "",
    ]
    return "\n".join(lines)
