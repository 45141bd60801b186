"""How coherent across denoising steps is a plan's error, and how far does a LoRA scale move it
(BENCHMARKS.md, "Finetune diagnostics")? Replays recorded dense generations (``sparsediff finetune``'s
``teacher/*.pt``) under a plan or plan folder; per recording: the guided-prediction error per step, the
cosine of consecutive steps' errors, and ||sum_t g_t||^2 / sum_t ||g_t||^2 (the steps' count if every step
erred alike, 1 if independently).

    python docs/diagnostics/step_coherence.py PLAN_OR_FOLDER GUIDANCE REC.pt [REC.pt ...] [--scale C ...]
"""

import argparse

import torch

from sparsediff.embedded import load_embedded_pipeline
from sparsediff.finetune import load_recording, replay_call
from sparsediff.plan import ADAPTER_NAME


def guided_errors(transformer, generation, guidance: float) -> list[torch.Tensor]:
    """The guided prediction's error of every denoising step that ran both CFG branches."""
    by_step: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for call in generation:
            err = replay_call(transformer, call, "cpu").float() - call.target.float()
            by_step.setdefault(call.step, {})[str(call.branch)] = err
    out = []
    for step in sorted(by_step):
        e = by_step[step]
        if "cond" in e and "uncond" in e:
            out.append(e["uncond"] + guidance * (e["cond"] - e["uncond"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("guidance", type=float)
    ap.add_argument("recordings", nargs="+")
    ap.add_argument("--scale", type=float, nargs="*", default=[1.0], help="LoRA scale multipliers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_embedded_pipeline()
    tr = pipe.transformer.eval()
    pipe.enable_sparse_attention(args.plan)
    layers = [m for m in tr.modules() if ADAPTER_NAME in (getattr(m, "scaling", None) or {})]
    base = [m.scaling[ADAPTER_NAME] for m in layers]
    recs = {r: load_recording(r) for r in args.recordings}
    for c in args.scale if layers else [1.0]:
        for m, b in zip(layers, base):
            m.scaling[ADAPTER_NAME] = b * c
        for name, gen in recs.items():
            gs = [g for g in guided_errors(tr, gen, args.guidance) if g.abs().max() > 0]
            norms = torch.stack([g.pow(2).mean() for g in gs])
            total = sum(gs)
            ratio = float(total.pow(2).mean() / norms.sum())
            cos = [
                float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
                for a, b in zip(gs, gs[1:])
            ]
            print(f"scale {c} {name}: {len(gs)} sparse steps, guided MSE {float(norms.mean()):.3e}, "
                  f"coherence {ratio:.2f}, cos(next) " + " ".join(f"{x:.2f}" for x in cos), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
