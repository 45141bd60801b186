"""The embedded model: a tiny text-to-video Wan DiT trained by sparsediff on procedural video.

* :func:`load_embedded_pipeline` -- the trained pipeline shipped in ``sparsediff/embedded/weights/`` (raises
  :class:`EmbeddedModelNotTrainedError`, with the training command, while that folder does not exist).
* :func:`tiny_random_pipeline` -- the same architecture, random-init (wiring tests and demos without weights;
  its attention is near uniform).
* :mod:`.data` procedural dataset, :mod:`.text` tokenizer/text encoder, :mod:`.pipeline` the diffusers
  pipeline, :mod:`.train` the training script, :mod:`.probe` per-head attention statistics, :mod:`.checks`
  colour/direction checks, :mod:`.card` the model card. See ``sparsediff/embedded/README.md``.
"""

from __future__ import annotations

import os

import torch

from .pipeline import EmbeddedModelConfig, EmbeddedVideoPipeline, build_pipeline

__all__ = [
    "WEIGHTS_DIR",
    "TRAIN_COMMAND",
    "EmbeddedModelNotTrainedError",
    "EmbeddedModelConfig",
    "EmbeddedVideoPipeline",
    "load_embedded_pipeline",
    "tiny_random_pipeline",
    "has_trained_weights",
    "shipped_plan_path",
    "PLAN_FILE",
]

#: Where the trained pipeline is shipped (inside the installed package).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
#: The one command that trains the embedded model on a GPU and installs it into :data:`WEIGHTS_DIR`.
TRAIN_COMMAND = "python -m sparsediff.embedded.train --preset gpu --out runs/embedded --install"


#: File name of the per-head sparse-attention plan searched for an exported model, next to its weights.
PLAN_FILE = "sparse_plan.json"


class EmbeddedModelNotTrainedError(FileNotFoundError):
    """The embedded model's weights are not in the package (it has not been trained yet)."""


def has_trained_weights(path: str | os.PathLike | None = None) -> bool:
    """Whether ``path`` (default :data:`WEIGHTS_DIR`) holds an exported pipeline."""
    return os.path.isfile(os.path.join(path or WEIGHTS_DIR, "model_index.json"))


def shipped_plan_path(path: str | os.PathLike | None = None) -> str | None:
    """The searched sparse-attention plan shipped with the model folder ``path`` (default :data:`WEIGHTS_DIR`):
    ``<folder>/sparse_plan.json``, or None when the folder has none (then the Wan family default applies)."""
    f = os.path.join(os.fspath(path or WEIGHTS_DIR), PLAN_FILE)
    return f if os.path.isfile(f) else None


def load_embedded_pipeline(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> EmbeddedVideoPipeline:
    """Load the trained embedded pipeline (offline, local folder).

    Args:
        path: a folder written by the training script (``OUT/pipeline``); default the shipped
            :data:`WEIGHTS_DIR`. dtype: the weights are stored in fp16; fp32 (default) suits CPUs.

    Raises:
        EmbeddedModelNotTrainedError: no exported pipeline there; the message gives the training command.
    """
    folder = os.fspath(path or WEIGHTS_DIR)
    if not has_trained_weights(folder):
        raise EmbeddedModelNotTrainedError(
            f"no trained embedded model at {folder}: the embedded model has not been trained yet. Train it on a "
            f"GPU (about 15 minutes) with\n    {TRAIN_COMMAND}\n(--install copies runs/embedded/pipeline into "
            f"{WEIGHTS_DIR}), or pass path= to a folder it exported. For wiring tests without weights use "
            "sparsediff.embedded.tiny_random_pipeline()."
        )
    pipe = EmbeddedVideoPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_random_pipeline(seed: int = 0, config: EmbeddedModelConfig | None = None) -> EmbeddedVideoPipeline:
    """The embedded architecture (default: the shipped ``gpu`` preset's) with random weights, fp32, CPU,
    eval mode, progress bar off. Random-init attention is near uniform: this proves wiring, not quality."""
    pipe = build_pipeline(config or EmbeddedModelConfig(), seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe
