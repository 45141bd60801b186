"""The ``sparsediff`` command line: ``sparsediff demo``, ``bench``, ``compare``, ``info``."""

from __future__ import annotations

import argparse
import sys


def _info(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="sparsediff info", description="Versions and backend support.").parse_args(
        argv
    )
    import torch

    import sparsediff
    from sparsediff.kernels import launch as kernels

    print(f"sparsediff {sparsediff.__version__}")
    print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    if kernels.triton_available():
        import triton

        print(f"triton {triton.__version__} (interpreter: {kernels.interpreter_enabled()})")
    else:
        print("triton not installed: the PyTorch reference path is used")
    from sparsediff.pipelines.base import supported_classes

    print("supported transformers: " + ", ".join(sorted(supported_classes())))
    return 0


_COMMANDS = {
    "demo": ("sparsediff.demo", "generate dense vs sparse on the embedded tiny video pipeline"),
    "bench": ("sparsediff.bench", "time the block-sparse op against dense SDPA / FlexAttention"),
    "compare": ("sparsediff.compare", "dense vs plans on the same prompts/seeds: metrics, videos, report"),
    "search": ("sparsediff.search.cli", "profile a pipeline and search a per-head plan"),
    "plan": ("sparsediff.search.show", "plan show PLAN [--png FILE]: summary and layer x head heatmap"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "sparsediff <command> [options]\n\ncommands:\n"
        + "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in _COMMANDS.items())
        + "\n  info     versions and backend support"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: " + usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return _info(rest)
    if cmd not in _COMMANDS:
        print(f"sparsediff: unknown command {cmd!r}\nusage: {usage}", file=sys.stderr)
        return 2
    import importlib

    mod = importlib.import_module(_COMMANDS[cmd][0])
    rc = mod.main(rest)  # an exit status, or what the command printed (bench returns its table)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
