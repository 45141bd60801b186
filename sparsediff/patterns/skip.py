"""``skip``: the head's output is reused from the last dense pass of its layer. Cross-step; no parameters.

A dense pass of the layer (``force_dense``: warm-up steps/layers, refresh steps) stores the head's output
``[B, N, D]`` in the family's slot of the layer's state (``state.family_state("skip")``: ``{head: out}``);
later calls skip the head entirely (an empty mask row -- no blocks computed) and copy the stored output in.
Before any output is stored (no dense pass yet, or no state) the head is computed densely and its output
stored.

Search: a cross-step candidate (measured as the previous profiled step's output, ``"reuse_output"``),
priced as one copy of the stored output.
"""

from __future__ import annotations

import logging

import torch

from ..mask import BlockSparseMask
from ..support import cdiv
from .registry import CROSS_STEP, GroupCall, GroupWork, builtin_family
from .specs import HeadSpec

logger = logging.getLogger(__name__)

__all__: list[str] = []

NAME = "skip"


def _empty_mask(call: GroupCall, heads: int) -> BlockSparseMask:
    n, bs = call.num_tokens, call.block_size
    nb = cdiv(n, bs)
    idx = torch.zeros(1, heads, nb, 1, dtype=torch.int32, device=call.device)
    counts = torch.zeros(1, heads, nb, dtype=torch.int32, device=call.device)
    return BlockSparseMask(idx, counts, bs, (n, n), validate=False)


def _outputs(state) -> dict[int, torch.Tensor]:
    """``{head: [B, N, D]}``: this family's slot of the layer state."""
    return state.family_state(NAME)


def _store(state, heads, out) -> None:
    stored = _outputs(state)
    for h in heads:
        stored[h] = out[:, h].detach().clone()


def _build_group(call: GroupCall, spec, heads) -> GroupWork:
    state = call.state
    B, N, D = call.q.shape[0], call.num_tokens, call.v.shape[3]
    stored = _outputs(state) if state is not None else {}
    if state is not None and all(h in stored and stored[h].shape == (B, N, D) for h in heads):

        def fill(out, lse):
            for h in heads:
                out[:, h] = stored[h]

        return GroupWork(mask=_empty_mask(call, len(heads)), after=fill, writes_output=True)
    logger.debug("skip heads %s have no stored output yet: computed densely", heads)
    after = None if state is None else (lambda out, lse: _store(state, heads, out))
    return GroupWork(mask=call.full_mask(len(heads)), after=after)


def _on_dense(call: GroupCall, spec, heads, out, lse) -> None:
    if call.state is not None:
        _store(call.state, heads, out)


FAMILY = builtin_family(
    NAME,
    params={},
    checks={},
    kind=CROSS_STEP,
    doc="output reused from the layer's last dense pass",
    build_group=_build_group,
    on_dense=_on_dense,
    candidates=lambda layout, block_size: [HeadSpec.make(NAME)],
    cost=lambda model, spec, density, layout: model.copy_cost(layout),
    cross_step_measure="reuse_output",
)
