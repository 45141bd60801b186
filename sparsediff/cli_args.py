"""Argparse pieces every ``sparsediff`` command shares: one name and one meaning per flag.

* :func:`add_video_args` -- ``--frames --height --width --steps --guidance-scale`` (``--steps`` >= 1, checked
  by argparse: exit status 2);
* :func:`add_seeds_arg` -- ``--seeds N [N ...]``;
* :func:`add_output_args` -- ``--out``, ``--overwrite``, ``--no-progress``;
* :func:`add_threads_arg` / :func:`apply_threads` -- ``--threads N`` (torch CPU threads);
* :func:`add_cp_arg` -- ``--cp ulysses=U,ring=R``: diffusers context parallelism over the processes of
  ``accelerate launch`` (:func:`sparsediff.loading.enable_context_parallel` turns it on);
* :func:`deprecated_alias` -- an old spelling kept for one release: accepted, with a one-line warning on
  stderr naming the new flag;
* :class:`InputError` -- a bad input found before any generation; commands print it as one line and exit 2;
* :class:`Parser` -- the commands' ``argparse`` parser: a usage error (a missing, unknown or out-of-range
  flag) is one line too, ``prog: error: ... (see --help)``, exit status 2, not argparse's usage block.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "InputError",
    "Parser",
    "positive_int",
    "nonnegative_int",
    "deprecated_alias",
    "add_video_args",
    "add_seeds_arg",
    "add_output_args",
    "add_threads_arg",
    "apply_threads",
    "add_cp_arg",
    "context_parallel_degrees",
    "fail",
    "read_prompts_file",
]


class InputError(ValueError):
    """A bad command-line input, found before anything is generated or written (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr (exit status 2), like every other
    bad input of the CLI; ``--help`` still prints the full usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def fail(prog: str, error: BaseException | str) -> int:
    """Print ``prog: error: <one line>`` on stderr and return the exit status 2."""
    text = " ".join(str(error).split("\n"))
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with ``#`` are skipped.
    Raises :class:`InputError` for a missing or unreadable file (an empty list is the caller's to judge)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"prompts file {p} is a directory")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompts file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts file {p}: {e}") from None
    return [q for q in (ln.strip() for ln in text.splitlines()) if q and not q.startswith("#")]


def _int_at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
    return n


def positive_int(text: str) -> int:
    """Argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """Argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """Argparse type: a finite float > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def _warning_action(new: str, base: type[argparse.Action]) -> type[argparse.Action]:
    class _Deprecated(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            print(
                f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {new}",
                file=sys.stderr,
            )
            super().__call__(parser, namespace, values, option_string)

    return _Deprecated


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden spelling of the already-added flag ``new`` (same dest, type and nargs),
    printing a one-line warning on stderr when it is used."""
    target = next(a for a in parser._actions if new in a.option_strings)
    kwargs: dict[str, Any] = {"dest": target.dest, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
    if isinstance(target, argparse._StoreTrueAction):
        kwargs["action"] = _warning_action(new, argparse._StoreTrueAction)
    else:
        kwargs["action"] = _warning_action(new, argparse._StoreAction)
        kwargs.update(type=target.type, nargs=target.nargs, metavar=target.metavar)
        if target.choices is not None:
            kwargs["choices"] = target.choices
    parser.add_argument(old, **kwargs)


def add_video_args(
    parser: argparse.ArgumentParser,
    *,
    steps_default: str = "the pipeline's",
    size_default: str = "the pipeline's",
    guidance_default: str = "the pipeline's",
) -> None:
    """``--frames --height --width --steps --guidance-scale`` (all default ``None``: the pipeline's own),
    with the deprecated spellings ``--num-frames`` and ``--guidance``."""
    parser.add_argument(
        "--frames", type=positive_int, metavar="N", help=f"video frames (default: {size_default})"
    )
    parser.add_argument(
        "--height", type=positive_int, metavar="PX", help=f"height in px (default: {size_default})"
    )
    parser.add_argument(
        "--width", type=positive_int, metavar="PX", help=f"width in px (default: {size_default})"
    )
    parser.add_argument(
        "--steps", type=positive_int, metavar="N", help=f"denoising steps, >= 1 (default: {steps_default})"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        metavar="G",
        help=f"classifier-free guidance scale (default: {guidance_default})",
    )
    deprecated_alias(parser, "--num-frames", "--frames")
    deprecated_alias(parser, "--guidance", "--guidance-scale")


def add_seeds_arg(parser: argparse.ArgumentParser, *, help: str = "generation seeds (default: 0)") -> None:
    """``--seeds N [N ...]`` (default ``[0]``), with the deprecated spelling ``--seed``."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="N", help=help)
    deprecated_alias(parser, "--seed", "--seeds")


def add_output_args(
    parser: argparse.ArgumentParser,
    *,
    out_help: str,
    out_default: str | None = None,
    out_metavar: str = "DIR",
    overwrite_help: str = "replace existing outputs in --out (never replaced without it)",
    progress: bool = True,
) -> None:
    """``--out``, ``--overwrite`` (deprecated spelling ``--force``) and ``--no-progress``."""
    parser.add_argument(
        "--out", default=out_default, required=out_default is None, metavar=out_metavar, help=out_help
    )
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    deprecated_alias(parser, "--force", "--overwrite")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; use 1 on a machine shared with other jobs)",
    )


def context_parallel_degrees(text: str) -> tuple[int, int]:
    """Argparse type of ``--cp``: ``ulysses=U,ring=R`` (either part may be left out: degree 1), e.g.
    ``ulysses=2``, ``ring=4``, ``ulysses=2,ring=2`` -> ``(ulysses, ring)``; at least one degree > 1."""
    degrees = {"ulysses": 1, "ring": 1}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name.strip() not in degrees:
            raise argparse.ArgumentTypeError(
                f"expected ulysses=U,ring=R (e.g. ulysses=2,ring=2), got {text!r}"
            )
        try:
            degrees[name.strip()] = _int_at_least(value.strip(), 1)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{name.strip()}: {e}") from None
    if degrees["ulysses"] * degrees["ring"] == 1:
        raise argparse.ArgumentTypeError(f"at least one of ulysses / ring must be > 1, got {text!r}")
    return degrees["ulysses"], degrees["ring"]


def add_cp_arg(parser: argparse.ArgumentParser) -> None:
    """``--cp ulysses=U,ring=R``: context parallelism (default: none)."""
    parser.add_argument(
        "--cp",
        type=context_parallel_degrees,
        metavar="ulysses=U,ring=R",
        default=None,
        help="split every generation over the processes of `accelerate launch --num_processes U*R` with "
        "diffusers context parallelism (Ulysses x ring), for models too large for one GPU; sparse "
        "attention runs on each rank's share (default: none -- processes split the prompts instead)",
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads when ``--threads`` was given."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def parser_flags(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """``(flags, help)`` of every visible option of ``parser`` (for the README table)."""
    rows = []
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
            continue
        rows.append((", ".join(a.option_strings), a.help or ""))
    return rows


#: What a command's ``build_parser`` looks like.
ParserFactory = Callable[[], argparse.ArgumentParser]
