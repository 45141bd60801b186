"""Which pipeline a command runs on: ``--model`` / ``--pipeline MODULE:FUNCTION`` / the embedded model.

One loader, one set of error messages, for ``sparsediff compare`` and ``sparsediff search``:

* ``--model ID_OR_FOLDER``: a diffusers model id or folder, loaded with
  ``DiffusionPipeline.from_pretrained`` (a folder of the embedded model's ``EmbeddedVideoPipeline`` through
  :func:`sparsediff.embedded.load_embedded_pipeline`);
* ``--pipeline MODULE:FUNCTION``: ``FUNCTION()`` returns a pipeline, or ``(pipeline, call kwargs)``;
* neither: the embedded trained model when its weights are in the package; otherwise (when the command
  allows it) its random-init twin, with a warning, else an error.

:func:`check_source` checks what can be checked without loading (the form of ``--pipeline``, that a
local ``--model`` folder exists); :func:`load_pipeline` raises :class:`PipelineSourceError` (an
:class:`~sparsediff.cli_args.InputError`) with the messages below.

Also :func:`random_wan_pipeline`, the tiny random-init ``WanPipeline`` of ``sparsediff demo --model random-wan``,
:func:`distributed` (the processes of ``accelerate launch``) and :func:`enable_context_parallel` (``--cp``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli_args import InputError

__all__ = [
    "PipelineSourceError",
    "LoadedPipeline",
    "add_source_args",
    "check_source",
    "load_pipeline",
    "random_wan_pipeline",
    "distributed",
    "enable_context_parallel",
    "exit_process",
    "finish_processes",
]

logger = logging.getLogger(__name__)


class PipelineSourceError(InputError):
    """``--model`` / ``--pipeline`` cannot give a pipeline (the message says why and what to pass)."""


@dataclass
class LoadedPipeline:
    """A loaded pipeline, the call kwargs its factory returned (``{}`` otherwise) and a description."""

    pipe: Any
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def add_source_args(parser: argparse.ArgumentParser, *, default: str = "the embedded trained model") -> None:
    """``--model ID_OR_FOLDER`` and ``--pipeline MODULE:FUNCTION`` (mutually exclusive)."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        metavar="ID_OR_FOLDER",
        help=f"a diffusers model id or folder (DiffusionPipeline.from_pretrained; default: {default})",
    )
    src.add_argument(
        "--pipeline",
        metavar="MODULE:FUNCTION",
        help="a function returning a diffusers pipeline (or (pipeline, call kwargs))",
    )


def _looks_local(model: str) -> bool:
    """A path rather than a Hub id (``org/name``): absolute, relative with ./ or ~, or deeper than 2."""
    return model.startswith((".", "/", "~", "\\")) or model.count("/") > 1


def _factory(pipeline: str) -> Any:
    mod_name, _, fn_name = pipeline.partition(":")
    if not mod_name or not fn_name:
        raise PipelineSourceError(f"--pipeline {pipeline!r}: expected MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise PipelineSourceError(f"--pipeline {pipeline}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise PipelineSourceError(f"--pipeline {pipeline}: {fn_name} is not callable")
    return fn


def check_source(pipeline: str | None, model: str | None) -> None:
    """What can be checked without loading a model: one source at most, the form of ``--pipeline`` and
    that its function exists (its module is imported), a local ``--model`` folder; raises
    :class:`PipelineSourceError`."""
    if pipeline and model:
        raise PipelineSourceError("pass at most one of --pipeline and --model")
    if pipeline:
        _factory(pipeline)
    if model:
        p = Path(model).expanduser()
        if p.exists():
            if not p.is_dir() or not (p / "model_index.json").is_file():
                raise PipelineSourceError(
                    f"--model {model}: not a diffusers pipeline folder (no model_index.json)"
                )
        elif _looks_local(model):
            raise PipelineSourceError(f"--model {model}: no such folder")


def _from_factory(pipeline: str) -> LoadedPipeline:
    res = _factory(pipeline)()
    if isinstance(res, tuple):
        pipe, kwargs = res[0], dict(res[1]) if len(res) > 1 else {}
    else:
        pipe, kwargs = res, {}
    return LoadedPipeline(pipe, kwargs, {"source": f"--pipeline {pipeline}", "trained": None})


def _from_model(model: str, dtype: torch.dtype | None) -> LoadedPipeline:
    from . import embedded

    index = Path(model).expanduser() / "model_index.json"
    info = {"source": f"--model {model}", "trained": None}
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "EmbeddedVideoPipeline":
        return LoadedPipeline(embedded.load_embedded_pipeline(model, dtype=dtype or torch.float32), {}, info)
    from diffusers import DiffusionPipeline

    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineSourceError(f"--model {model}: not a loadable diffusers pipeline: {first}") from None
    return LoadedPipeline(pipe, {}, info)


def _default(allow_random: bool, command: str, dtype: torch.dtype | None) -> LoadedPipeline:
    from . import embedded

    if embedded.has_trained_weights():
        pipe = embedded.load_embedded_pipeline(dtype=dtype or torch.float32)
        return LoadedPipeline(
            pipe, {}, {"source": "embedded trained model (sparsediff/embedded/weights)", "trained": True}
        )
    if not allow_random:
        raise PipelineSourceError(
            "give --pipeline MODULE:FUNCTION or --model ID_OR_FOLDER (the embedded model is the default, but "
            "its trained weights are not in this installation)"
        )
    logger.warning(
        "%s: the embedded model's trained weights are not in this package; using its random-init twin "
        "(near-uniform attention: shows speed and density, not quality). Pass --model ID_OR_FOLDER or "
        "--pipeline MODULE:FUNCTION for a real model.",
        command,
    )
    info = {"source": "embedded model, random init (trained weights not in the package)", "trained": False}
    return LoadedPipeline(embedded.tiny_random_pipeline(), {}, info)


def load_pipeline(
    pipeline: str | None = None,
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    allow_random: bool = True,
    command: str = "sparsediff",
) -> LoadedPipeline:
    """Load the pipeline named by ``--pipeline`` / ``--model`` (or the default, see the module docstring),
    move it to ``device`` (when given) and describe it in ``info`` (``source``, ``trained``, ``class``,
    ``transformers``). Raises :class:`PipelineSourceError`."""
    check_source(pipeline, model)
    if pipeline:
        loaded = _from_factory(pipeline)
        if dtype is not None:
            loaded.pipe = loaded.pipe.to(dtype=dtype)
    elif model:
        loaded = _from_model(model, dtype)
    else:
        loaded = _default(allow_random, command, dtype)
    if device is not None:
        loaded.pipe = loaded.pipe.to(device)
    comps = getattr(loaded.pipe, "components", {}) or {}
    loaded.info["class"] = type(loaded.pipe).__name__
    loaded.info["transformers"] = {
        n: type(m).__name__
        for n, m in comps.items()
        if n.startswith("transformer") and isinstance(m, torch.nn.Module)
    }
    return loaded


def random_wan_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random-init ``WanPipeline`` (4 layers, 4 heads x 32, text dim 64, no text encoder), offline."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def distributed() -> tuple[int, int, Any]:
    """(rank, world size, accelerate state or None): several processes only under ``accelerate launch``."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    # cpu=True without CUDA: gloo process group (MULTI_CPU); accelerate would otherwise run each
    # process alone. The state is a singleton: every caller in the process shares it.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def finish_processes(state: Any) -> None:
    """Several processes (``state`` from :func:`distributed`; ``None`` or one process: nothing to do): wait
    until every process is done, then tear the process group down -- a process that exits while gloo's
    threads still serve the group aborts ("terminate called without an active exception")."""
    if state is None or getattr(state, "num_processes", 1) <= 1:
        return
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    global _FINISHED_PROCESS_GROUP
    _FINISHED_PROCESS_GROUP = True


#: set by :func:`finish_processes` once this process has torn a process group down
_FINISHED_PROCESS_GROUP = False


def exit_process(code: int) -> None:
    """End a ``python -m sparsediff.<tool>`` process with ``code``. After a multi-process run
    (:func:`finish_processes` ran) the streams are flushed and the process leaves with ``os._exit``: gloo's
    worker threads (also those of the sub-groups diffusers' context parallelism creates) can still be joinable
    when the interpreter finalises, and destroying them then aborts the process ("terminate called without
    an active exception", SIGABRT, seen in CI under ``accelerate launch``) after all its work is done and
    written. Every other run exits normally."""
    if not _FINISHED_PROCESS_GROUP:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code or 0))


def enable_context_parallel(pipe: Any, degrees: tuple[int, int] | None, world: int) -> dict[str, int] | None:
    """``--cp``: ``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=U, ring_degree=R))``
    on every transformer of ``pipe`` (call it before sparse attention is enabled, after the pipeline is on
    its device). ``degrees``: ``(U, R)`` or None (nothing to do). ``U * R`` must equal the number of
    processes. Returns ``{"ulysses": U, "ring": R}`` for the report, or None. Raises :class:`InputError`.

    On a machine without an accelerator (CPU processes on gloo) diffusers 0.42.1 divides by
    ``torch.accelerator.device_count() == 0`` while resolving the parallel config; only when that exact
    error is raised, the call is repeated with the count read as 1 (the device becomes ``cpu:0``).
    """
    if degrees is None:
        return None
    u, r = degrees
    if u * r != world:
        raise InputError(
            f"--cp ulysses={u},ring={r} needs {u * r} processes (accelerate launch --num_processes {u * r}), "
            f"got {world}"
        )
    try:
        from diffusers import ContextParallelConfig
    except ImportError:
        raise InputError("--cp needs a diffusers with ContextParallelConfig (>= 0.36)") from None
    comps = getattr(pipe, "components", {}) or {}
    transformers = [
        m for n, m in comps.items() if n.startswith("transformer") and isinstance(m, torch.nn.Module)
    ]
    if not transformers or not all(hasattr(t, "enable_parallelism") for t in transformers):
        raise InputError(f"--cp: {type(pipe).__name__} has no diffusers transformer with enable_parallelism")
    for t in transformers:
        if getattr(t, "_cp_plan", None) is None:
            raise InputError(
                f"--cp: {type(t).__name__} declares no context-parallel plan (_cp_plan) in diffusers"
            )
        cfg = ContextParallelConfig(ulysses_degree=u if u > 1 else None, ring_degree=r if r > 1 else None)
        try:
            t.enable_parallelism(config=cfg)
        except ZeroDivisionError:
            if torch.accelerator.device_count() != 0:
                raise
            from unittest import mock

            with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                t.enable_parallelism(config=cfg)
    return {"ulysses": u, "ring": r}
