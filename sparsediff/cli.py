"""The ``sparsediff`` command line: ``sparsediff demo``, ``bench``, ``compare``, ``search``, ``plan``, ``info``.

Every command module exposes ``build_parser()`` (the parser, built without running anything) and
``main(argv)``. :func:`cli_table` renders the flags of every command as a Markdown table from those
parsers -- README's CLI table is its output (``python -m sparsediff.cli --markdown-table``).
"""

from __future__ import annotations

import argparse
import sys


def build_info_parser() -> argparse.ArgumentParser:
    from .cli_args import Parser

    return Parser(prog="sparsediff info", description="Versions and backend support.")


def _info(argv: list[str]) -> int:
    build_info_parser().parse_args(argv)
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
    "finetune": ("sparsediff.finetune", "train a LoRA that teaches a model its sparse plan (dense teacher)"),
}


#: Column name -> (module, how to get the parser) for :func:`cli_table`.
_TABLE_COMMANDS = {
    "demo": "sparsediff.demo",
    "compare": "sparsediff.compare",
    "search": "sparsediff.search.cli",
    "plan show": "sparsediff.search.show",
    "bench": "sparsediff.bench",
    "gpucheck": "sparsediff.gpucheck",
    "finetune": "sparsediff.finetune",
}
#: The meaning of flags whose help differs per command only in defaults (the table states it once).
_SHARED_MEANING = {
    "--overwrite": "replace existing outputs (--out; plan show: --png); nothing is replaced without it",
    "--out": "where the results go: a folder (a file for search's plan and bench's Markdown)",
    "--seeds": "generation seeds, one or more (search: one); default 0",
    "--prompts": "text file, one prompt per line (# comments, blank lines skipped)",
    "--model": "a diffusers model id or folder (demo: also 'embedded' / 'random-wan'); default: the embedded "
    "trained model",
    "--device": "torch device (default: cuda if available)",
    "--block-size": "tokens per mask block (default 64; bench on CUDA 128)",
    "--steps": "denoising steps, >= 1 (default: the pipeline's / model's); finetune: optimizer steps (its "
    "denoising steps are --inference-steps)",
}
TABLE_START, TABLE_END = "<!-- cli-table:start -->", "<!-- cli-table:end -->"


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (``plan show``: the subcommand's), built without running anything."""
    import importlib

    out = {}
    for name, module in _TABLE_COMMANDS.items():
        parser = importlib.import_module(module).build_parser()
        if name == "plan show":
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices["show"]
        out[name] = parser
    return out


def _is_deprecated(action: argparse.Action) -> bool:
    return action.help == argparse.SUPPRESS and type(action).__name__ == "_Deprecated"


def cli_table() -> str:
    """A Markdown table of every command's flags (rows) by command (columns), from the parsers, followed
    by the deprecated spellings still accepted. README's CLI table is exactly this text."""
    parsers = command_parsers()
    # the meaning column: the help of the most general command that has the flag
    priority = ["compare", "search", "demo", "bench", "plan show", "gpucheck", "finetune"]
    parsers = {c: parsers[c] for c in priority} | parsers
    flags: dict[str, dict[str, str]] = {}  # flag -> command -> metavar / ✓
    helps: dict[str, str] = {}
    deprecated: dict[str, set[str]] = {}
    for cmd, parser in parsers.items():
        for a in parser._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            flag = max(a.option_strings, key=len)
            if _is_deprecated(a):
                new = next(b for b in parser._actions if b.dest == a.dest and not _is_deprecated(b))
                deprecated.setdefault(f"`{flag}` → `{max(new.option_strings, key=len)}`", set()).add(cmd)
                continue
            if a.help == argparse.SUPPRESS:
                continue
            takes_value = a.nargs != 0
            meta = (a.metavar or a.dest.upper()) if takes_value else ""
            if a.choices is not None and takes_value:
                meta = "\\|".join(map(str, a.choices))
            if a.nargs in ("+", "*"):
                meta += " ..."
            meta = meta.replace("|", "\\|").replace("\\\\|", "\\|")
            flags.setdefault(flag, {})[cmd] = f"`{meta}`" if meta else "✓"
            helps.setdefault(flag, " ".join((a.help or "").split()).replace("|", "\\|"))
    cmds = list(_TABLE_COMMANDS)
    order = sorted(flags, key=lambda f: (-len(flags[f]), f))  # shared flags first
    lines = ["| flag | " + " | ".join(cmds) + " | meaning |"]
    lines.append("|---" * (len(cmds) + 2) + "|")
    for f in order:
        cells = [flags[f].get(c, "") for c in cmds]
        lines.append(f"| `{f}` | " + " | ".join(cells) + f" | {_SHARED_MEANING.get(f, helps[f])} |")
    lines.append("")
    lines.append(
        "Deprecated spellings, accepted for one release with a warning on stderr: "
        + "; ".join(f"{k} ({', '.join(c for c in cmds if c in v)})" for k, v in sorted(deprecated.items()))
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--markdown-table"]:
        print(cli_table(), end="")
        return 0
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
