"""Sensitivity of the embedded model's sampler to per-call prediction errors (BENCHMARKS.md, "Finetune
diagnostics"): dense generations with Gaussian noise of a given MSE added to every transformer call's output,
PSNR of the decoded videos vs the clean dense ones.

    python docs/diagnostics/step_noise.py PROMPTS.txt 1e-5 5e-5
"""

import json
import math
import sys

import torch

from sparsediff.embedded import load_embedded_pipeline


def main() -> None:
    torch.set_num_threads(1)
    prompts = [ln.strip() for ln in open(sys.argv[1]) if ln.strip() and not ln.startswith("#")]
    levels = [float(x) for x in sys.argv[2:]] or [1e-5, 5e-5]
    pipe = load_embedded_pipeline()
    state = {"sigma": 0.0, "gen": None}

    def add_noise(module, args, out):
        if state["sigma"] == 0.0:
            return out
        t = out[0] if isinstance(out, tuple) else out.sample
        noisy = t + torch.randn(t.shape, generator=state["gen"], dtype=t.dtype) * state["sigma"]
        if isinstance(out, tuple):
            return (noisy, *out[1:])
        out.sample = noisy
        return out

    pipe.transformer.eval().register_forward_hook(add_noise)

    def generate(prompt: str, seed: int) -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            o = pipe(prompt=prompt, num_frames=16, height=64, width=64, num_inference_steps=20,
                     guidance_scale=4.0, generator=g, output_type="np")  # fmt: skip
        return torch.as_tensor(o.frames[0]).float()

    jobs = [(p, s) for p in prompts for s in (0, 1, 2)]
    ref = {j: generate(*j) for j in jobs}
    for mse in levels:
        state["sigma"] = math.sqrt(mse)
        errs = []
        for p, s in jobs:
            state["gen"] = torch.Generator("cpu").manual_seed(1234 + s)
            errs.append(float((generate(p, s) - ref[p, s]).pow(2).mean()))
        pooled = 10 * math.log10(len(errs) / sum(errs))
        per_video = [round(10 * math.log10(1 / e), 2) for e in errs]
        print(
            json.dumps({"noise_mse": mse, "pooled_psnr": round(pooled, 2), "per_video": per_video}),
            flush=True,
        )


if __name__ == "__main__":
    main()
