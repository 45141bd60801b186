"""Radial attention's block rules, accuracy vs compute (issue 9): ``block_rule="any"`` vs ``"reference"``.

For each rule and decay it measures

* **compute** -- the fraction of the ``N x N`` query-key pairs the :class:`~sparsediff.mask.BlockSparseMask`
  computes on real tokens (``mask.density()``; ragged last blocks counted by their real size);
* **accuracy** -- the relative L2 error ``|O_sparse - O_dense| / |O_dense|`` of the head output against
  exact dense attention, and the **recall**: the dense attention mass inside the mask, mean over queries.

on (a) planted-structure heads and (b) the trained embedded model shipped in the package.

(a) Heads: three radial energy-decay heads, ``logit = -(a_t |df| + a_s sqrt(dh^2 + dw^2))`` plus Gaussian
logit noise (std 0.1), the post-softmax decay the radial-attention authors assume, with ``(a_t, a_s)`` =
(0.5, 0.5), (0.2, 0.3) (slow) and (1.0, 0.15) (fast in time, broad in space); and the ``local`` (3D
Gaussian window) and ``temporal`` heads of :func:`sparsediff.testing.planted_qkv`. Text tokens, when the
shape has them, get near-uniform logits around -2. A random block mask with the same number of blocks in
every query-block row (mean of 3 draws) is the no-structure baseline. ``coverage>=t`` is a candidate
third rule measured here only (not in the library): keep a block when at least a fraction ``t`` of its
real token pairs is in radial's token pattern (``any`` is ``coverage > 0``).

(b) The embedded model (8x32x32 px = 8x8x8 = 512 tokens, 6 heads x 32, 4 layers): q/k/v of every layer
captured (conditional branch) at steps 2, 6, 10, 14, 18 of a dense 20-step generation of each prompt;
per layer the mean error / recall over heads, steps and prompts. End to end: each prompt generated
with ``Plan.uniform("radial", decay=..., block_rule=...)`` (every layer and step sparse: no warm-up, no
dense layer, so the rule is all that differs), 20 steps, CFG 4, seed 0, the reference twin; PSNR /
SSIM against the dense video (:mod:`sparsediff.metrics`). Masks identical block for block give the same
video bit for bit, so each distinct mask is generated once and the table says which rows share it.

The errors are computed from block partial sums of the exact dense softmax (per query: the mass and the
``P @ V`` of every key block), which is exactly block-sparse attention with that mask (renormalised
softmax over the kept keys); ``tests/test_radial_rules.py`` checks this against
:func:`sparsediff.reference.block_sparse_attention`.

    python samples/radial_rules.py              # planted + embedded (about 2 min of CPU, one thread)
    python samples/radial_rules.py --quick      # one planted shape, embedded per-layer only
    python samples/radial_rules.py --part planted | embedded
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sparsediff.layout import TokenLayout
from sparsediff.mask import BlockSparseMask
from sparsediff.patterns import static_mask
from sparsediff.patterns.common import block_token_counts, cdiv
from sparsediff.patterns.radial import radial_frame_rule
from sparsediff.specs import HeadSpec
from sparsediff.testing import planted_qkv

RULES = ("any", "reference")
DECAYS = (0.2, 0.5, 1.0)
COVERAGE = (0.25, 0.5, 0.75)  # thresholds of the candidate third rule (script only)
#: (a_t, a_s) of the planted energy-decay heads
ENERGY = {"energy .5/.5": (0.5, 0.5), "energy slow .2/.3": (0.2, 0.3), "energy fast-t 1/.15": (1.0, 0.15)}
PLANTED_SHAPES = [  # (layout, block)
    (TokenLayout.video(8, 16, 16), 64),
    (TokenLayout.video(12, 16, 16), 64),
    (TokenLayout.video(12, 15, 20), 64),  # 300 tokens per frame: frames straddle blocks
    (TokenLayout.video(11, 15, 26, text_len=16, text_position="after"), 64),  # Wan's aspect, text after
    (TokenLayout.video(12, 9, 13), 64),  # 117 tokens per frame: under two blocks
]
EMBEDDED_BLOCKS = (64, 32, 16)
EMBEDDED_DECAYS = (0.2, 0.5, 0.75, 1.0)
CAPTURE_STEPS = (2, 6, 10, 14, 18)
PROMPTS = ("a red circle moving right", "a cyan square moving up quickly")


# ------------------------------------------------------------------------------------ measurement
class BlockPartials:
    """Exact dense attention of one head, kept as per-(query, key block) partial sums.

    ``logits [N, N]`` (float32, already scaled), ``v [N, D]``. ``mass[q, b]`` = dense softmax mass of
    query ``q`` in key block ``b``; ``pv[q, b]`` = ``sum_{k in b} P[q, k] v[k]``. Block-sparse attention
    with a block mask ``M [Qb, Kb]`` is then ``sum_b M pv / sum_b M mass`` per query (the softmax
    renormalised over the kept keys), its recall ``sum_b M mass``.
    """

    def __init__(self, logits: torch.Tensor, v: torch.Tensor, block: int) -> None:
        n, d = v.shape
        nb = cdiv(n, block)
        p = torch.softmax(logits.float(), dim=-1)
        self.out = p @ v.float()
        pad = nb * block - n
        pp = torch.nn.functional.pad(p, (0, pad)).view(n, nb, block)
        vp = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(nb, block, d)
        self.mass = pp.sum(-1)  # [N, Kb]
        self.pv = torch.einsum("qbk,bkd->qbd", pp, vp)  # [N, Kb, D]
        self.qblock = torch.arange(n) // block
        self.norm = float(self.out.norm())

    def evaluate(self, block_bool: torch.Tensor) -> tuple[float, float]:
        """(relative L2 error, recall) of the block mask ``[Qb, Kb]`` (bool)."""
        m = block_bool[self.qblock].float()  # [N, Kb]
        den = (m * self.mass).sum(-1)
        num = torch.einsum("qb,qbd->qd", m, self.pv)
        out = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], torch.zeros_like(num))
        return float((out - self.out).norm()) / self.norm, float(den.mean())


def random_like(block_bool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random block mask with the same number of kept blocks in every query-block row."""
    qb, kb = block_bool.shape
    order = torch.rand(qb, kb, generator=gen).argsort(-1)
    keep = torch.arange(kb).unsqueeze(0) < block_bool.sum(-1, keepdim=True)
    return torch.zeros_like(block_bool).scatter(1, order, keep)


def radial_token_pattern(layout: TokenLayout, block: int, decay: float) -> torch.Tensor:
    """``[N, N]`` bool: radial's token-level pattern (the definition in :mod:`sparsediff.patterns.radial`,
    no sink, dense_dist 1), tokens outside the grid dense."""
    n = layout.num_tokens
    F, H, W = layout.grid
    S, off = H * W, layout.grid_offset
    fi = torch.arange(F)
    d = (fi[:, None] - fi[None, :]).abs()
    full, allowed, w = radial_frame_rule(d, fi[None, :].expand(F, F), S, block, decay, False, 1)
    r = torch.arange(S)
    dist = (r[:, None] - r[None, :]).abs()
    grid = torch.zeros(F, S, F, S, dtype=torch.bool)
    for i in range(F):
        for j in range(F):
            if full[i, j]:
                grid[i, :, j] = True
            elif allowed[i, j]:
                grid[i, :, j] = dist <= w[i, j]
    out = torch.ones(n, n, dtype=torch.bool)
    out[off : off + F * S, off : off + F * S] = grid.view(F * S, F * S)
    return out


def coverage_blocks(token: torch.Tensor, block: int) -> torch.Tensor:
    """``[Qb, Kb]`` float: fraction of each block's real token pairs that ``token`` keeps."""
    n = token.shape[0]
    nb = cdiv(n, block)
    pad = nb * block - n
    t = torch.nn.functional.pad(token.float(), (0, pad, 0, pad)).view(nb, block, nb, block).sum((1, 3))
    c = block_token_counts(n, block)
    return t / (c[:, None] * c[None, :])


def density(block_bool: torch.Tensor, n: int, block: int) -> float:
    return BlockSparseMask.from_dense(block_bool[None, None], block, (n, n)).density()


def rule_masks(layout: TokenLayout, block: int, decays=DECAYS, coverage=COVERAGE) -> dict:
    """``{(rule, decay): [Qb, Kb] bool}`` for the library's rules and the coverage candidates."""
    out = {}
    for decay in decays:
        for rule in RULES:
            spec = HeadSpec.make("radial", decay=decay, block_rule=rule)
            out[rule, decay] = static_mask(layout, spec, block).to_dense()[0, 0]
        if coverage:
            cov = coverage_blocks(radial_token_pattern(layout, block, decay), block)
            if not torch.equal(cov > 0, out["any", decay]):  # cross-check of the token pattern
                raise AssertionError(f"token pattern disagrees with radial 'any' at {layout}, decay {decay}")
            for t in coverage:
                out[f"coverage>={t:g}", decay] = cov >= t
    return out


COVERAGE_PATTERN = "radial_coverage"


def register_coverage_pattern() -> None:
    """Register the candidate rule as a user pattern (``sparsediff.register_pattern``) so that the
    embedded model can run it end to end; the library itself does not have it."""
    from sparsediff import register_pattern

    def build(layout, spec, block_size, device):
        cov = coverage_blocks(radial_token_pattern(layout, block_size, spec.get("decay")), block_size)
        keep = (cov >= spec.get("threshold")).to(device)
        return BlockSparseMask.from_dense(keep[None, None], block_size, (layout.num_tokens,) * 2)

    register_pattern(
        COVERAGE_PATTERN, params={"decay": 1.0, "threshold": 0.5}, static_mask=build, replace=True,
        doc="radial with a block kept when >= threshold of its token pairs are in the pattern (sample only)",
    )  # fmt: skip


# ------------------------------------------------------------------------------------ planted heads
def energy_logits(layout: TokenLayout, a_t: float, a_s: float, gen: torch.Generator, noise: float = 0.1):
    """``[N, N]`` logits of an energy-decay head (module docstring); text rows/columns near -2."""
    n = layout.num_tokens
    F, H, W = layout.grid
    off = layout.grid_offset
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    f, h, w = (x.reshape(-1).float() for x in (f, h, w))
    df = (f[:, None] - f[None, :]).abs()
    ds = ((h[:, None] - h[None, :]) ** 2 + (w[:, None] - w[None, :]) ** 2).sqrt()
    logits = torch.full((n, n), -2.0) + noise * torch.randn(n, n, generator=gen)
    ng = F * H * W
    logits[off : off + ng, off : off + ng] += 2.0 - (a_t * df + a_s * ds)
    return logits


def planted_heads(layout: TokenLayout, head_dim: int = 32, seed: int = 0):
    """Yields ``(name, logits [N, N], v [N, D])``: the energy heads, then planted_qkv's local / temporal."""
    gen = torch.Generator().manual_seed(seed)
    for name, (a_t, a_s) in ENERGY.items():
        yield (
            name,
            energy_logits(layout, a_t, a_s, gen),
            torch.randn(layout.num_tokens, head_dim, generator=gen),
        )
    p = planted_qkv(layout, ["local", "temporal"], head_dim=head_dim, seed=seed)
    for h, kind in enumerate(p.kinds):
        yield f"planted {kind}", p.q[0, h] @ p.k[0, h].T * head_dim**-0.5, p.v[0, h]


def run_planted(shapes) -> list[dict]:
    rows = []
    for layout, block in shapes:
        n = layout.num_tokens
        t0 = time.time()
        masks = rule_masks(layout, block)
        dens = {key: density(m, n, block) for key, m in masks.items()}
        differ = {dec: int((masks["any", dec] != masks["reference", dec]).sum()) for dec in DECAYS}
        for head, logits, v in planted_heads(layout):
            bp = BlockPartials(logits, v, block)
            gen = torch.Generator().manual_seed(1)
            for (rule, dec), m in masks.items():
                err, rec = bp.evaluate(m)
                rnd = 0.0
                if rule in RULES:
                    rnd = sum(bp.evaluate(random_like(m, gen))[0] for _ in range(3)) / 3
                rows.append(
                    dict(
                        shape=f"{layout}", block=block, head=head, rule=rule, decay=dec, density=dens[rule, dec],
                        error=err, recall=rec, random_error=rnd, differ=differ[dec],
                    )
                )  # fmt: skip
        print(f"[planted] {layout} block {block}: {time.time() - t0:.1f} s", flush=True)
    return rows


def print_planted(rows: list[dict]) -> None:
    print("\n### planted heads: density (compute) / relative L2 error / recall, per rule and decay\n")
    print("| shape | B | head | decay | any: density / error / recall | reference: density / error / recall "
          "| random at reference's row counts: error | blocks differing | "
          + " | ".join(f"coverage>={t:g}: density / error" for t in COVERAGE) + " |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(COVERAGE))
    idx = {(r["shape"], r["head"], r["rule"], r["decay"]): r for r in rows}
    for r in rows:
        if r["rule"] != "any":
            continue
        key = (r["shape"], r["head"])
        ref = idx[(*key, "reference", r["decay"])]
        cov = [idx[(*key, f"coverage>={t:g}", r["decay"])] for t in COVERAGE]
        print(
            f"| {r['shape']} | {r['block']} | {r['head']} | {r['decay']:g} "
            f"| {r['density']:.3f} / {r['error']:.4f} / {r['recall']:.4f} "
            f"| {ref['density']:.3f} / {ref['error']:.4f} / {ref['recall']:.4f} | {ref['random_error']:.3f} "
            f"| {r['differ']} | " + " | ".join(f"{c['density']:.3f} / {c['error']:.4f}" for c in cov) + " |"
        )
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    print("\n### planted: density / mean error over the heads, per shape and decay\n")
    print(
        "| shape | B | decay | "
        + " | ".join(rules)
        + " | random at reference's row counts | blocks differing |"
    )
    print("|---|---|---|" + "---|" * (len(rules) + 2))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["block"], r["decay"]), {}).setdefault(r["rule"], []).append(r)
    for (shape, block, dec), by_rule in groups.items():
        cells = []
        for rule in rules:
            sel = by_rule[rule]
            cells.append(f"{sel[0]['density']:.3f} / {sum(x['error'] for x in sel) / len(sel):.4f}")
        ref = by_rule["reference"]
        rnd = sum(x["random_error"] for x in ref) / len(ref)
        print(
            f"| {shape} | {block} | {dec:g} | " + " | ".join(cells) + f" | {rnd:.3f} | {ref[0]['differ']} |"
        )


# ------------------------------------------------------------------------------------ embedded model
def run_embedded(end_to_end: bool, prompts=PROMPTS) -> None:
    from sparsediff import Plan, enable_sparse_attention
    from sparsediff.embedded import load_embedded_pipeline
    from sparsediff.metrics import video_metrics

    register_coverage_pattern()
    pipe = load_embedded_pipeline()
    sizes = {k: int(pipe.config[f"sample_{k}"]) for k in ("num_frames", "height", "width")}

    def generate(prompt: str):
        gen = torch.Generator("cpu").manual_seed(0)
        with torch.no_grad():
            return pipe(
                prompt=prompt, **sizes, num_inference_steps=20, guidance_scale=4.0, output_type="np", generator=gen
            ).frames[0]  # fmt: skip

    captured: list = []  # (layer, q, k, v, layout, scale) of the conditional branch at CAPTURE_STEPS

    def observer(call) -> None:
        if call.step in CAPTURE_STEPS and call.branch == 0:
            captured.append((call.layer, call.query[0].clone(), call.key[0].clone(), call.value[0].clone(),
                             call.layout, call.scale))  # fmt: skip

    t0 = time.time()
    dense = {}
    for p in prompts:
        handle = enable_sparse_attention(pipe, Plan.dense(), observer=observer)
        try:
            dense[p] = generate(p)
        finally:
            handle.disable()
    layout = captured[0][4]
    n = layout.num_tokens
    print(f"[embedded] dense generations and capture: {time.time() - t0:.1f} s; layout {layout}", flush=True)

    masks = {}
    for block in EMBEDDED_BLOCKS:
        for key, m in rule_masks(layout, block, EMBEDDED_DECAYS).items():
            masks[(block, *key)] = m
    layers = sorted({c[0] for c in captured})
    acc: dict = {}  # (block, rule, decay, layer) -> [error sum, recall sum, count]
    for layer, q, k, v, _lay, scale in captured:
        s = scale if scale is not None else q.shape[-1] ** -0.5
        for block in EMBEDDED_BLOCKS:
            parts = [BlockPartials(q[h].float() @ k[h].float().T * s, v[h], block) for h in range(q.shape[0])]
            for (b, rule, dec), m in masks.items():
                if b != block:
                    continue
                for bp in parts:
                    e, r = bp.evaluate(m)
                    a = acc.setdefault((b, rule, dec, layer), [0.0, 0.0, 0])
                    a[0] += e
                    a[1] += r
                    a[2] += 1

    print("\n### embedded model, per layer: mean relative L2 error (recall) over heads, steps, prompts\n")
    print("| B | decay | rule | density | blocks differing from any | "
          + " | ".join(f"layer {i}" for i in layers) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(layers))
    for block, rule, dec in masks:
        m = masks[block, rule, dec]
        diff = int((m != masks[block, "any", dec]).sum())
        cells = [acc[(block, rule, dec, i)] for i in layers]
        print(
            f"| {block} | {dec:g} | {rule} | {density(m, n, block):.3f} | {diff} | "
            + " | ".join(f"{a[0] / a[2]:.4f} ({a[1] / a[2]:.3f})" for a in cells)
            + " |"
        )
    if not end_to_end:
        return

    print("\n### embedded model end to end: uniform radial plan, every layer and step sparse, vs dense\n")
    print(
        "| B | decay | rule | density | PSNR vs dense (mean of prompts) | SSIM | per prompt PSNR | same mask as |"
    )
    print("|---|---|---|---|---|---|---|---|")
    done: dict = {}  # mask bytes -> (label, result)
    for block, rule, dec in masks:
        m = masks[block, rule, dec]
        sig = (block, bytes(m.flatten().numpy().tobytes()))
        label = f"B{block} {rule} {dec:g}"
        if sig in done:
            first, res = done[sig]
            same = first
        else:
            t0 = time.time()
            if rule in RULES:
                plan = Plan.uniform("radial", decay=dec, block_rule=rule)
            else:  # the candidate, through the public plug-in API
                plan = Plan.uniform(COVERAGE_PATTERN, decay=dec, threshold=float(rule.split(">=")[1]))
            handle = enable_sparse_attention(pipe, plan, backend="reference", block_size=block)
            try:
                metrics = [video_metrics(generate(p), dense[p]) for p in prompts]
                dens = handle.densities()["transformer"]
            finally:
                handle.disable()
            res = (sum(dens.values()) / len(dens), metrics)
            done[sig] = (label, res)
            same = "-"
            print(f"[embedded] {label}: {time.time() - t0:.1f} s", flush=True)
        d, metrics = res
        psnr = sum(x.psnr for x in metrics) / len(metrics)
        ssim = sum(x.ssim for x in metrics) / len(metrics)
        per = ", ".join(f"{x.psnr:.2f}" for x in metrics)
        print(
            f"| {block} | {dec:g} | {rule} | {d:.3f} | {psnr:.2f} dB | {ssim:.3f} | {per} | {same} |",
            flush=True,
        )


def conditions() -> str:
    import diffusers

    return (
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()} {platform.processor() or ''}".strip()
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "planted", "embedded"), default="all")
    ap.add_argument("--quick", action="store_true", help="one planted shape; embedded per layer only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.part in ("all", "planted"):
        shapes = PLANTED_SHAPES[2:3] if args.quick else PLANTED_SHAPES
        print_planted(run_planted(shapes))
    if args.part in ("all", "embedded"):
        run_embedded(end_to_end=not args.quick)
    print(f"\n({time.time() - t0:.0f} s wall, {time.process_time():.0f} s CPU; {conditions()})")


if __name__ == "__main__":
    main()
