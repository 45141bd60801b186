"""``skip``: the head's output is reused from the last dense pass of its layer. Cached; no parameters.

A dense pass of the layer (``force_dense``: warm-up steps/layers, refresh steps) stores the head's output
``[B, N, D]`` in the layer's state (``LayerState.skip_out``); later calls skip the head entirely (an empty
mask row -- no blocks computed) and copy the stored output in. Before any output is stored (no dense pass
yet, or no state) the head is computed densely and its output stored.
"""

from __future__ import annotations

import logging

from .registry import GroupCall, GroupPlan, register_builtin

logger = logging.getLogger(__name__)

__all__: list[str] = []


def _empty_mask(call: GroupCall, heads: int):
    import torch

    from ..mask import BlockSparseMask
    from ..support import cdiv

    n, bs = call.num_tokens, call.block_size
    nb = cdiv(n, bs)
    idx = torch.zeros(1, heads, nb, 1, dtype=torch.int32, device=call.device)
    counts = torch.zeros(1, heads, nb, dtype=torch.int32, device=call.device)
    return BlockSparseMask(idx, counts, bs, (n, n), validate=False)


def _store(state, heads, out) -> None:
    for h in heads:
        state.skip_out[h] = out[:, h].detach().clone()


def _plan(call: GroupCall, spec, heads) -> GroupPlan:
    state = call.state
    B, N, D = call.q.shape[0], call.num_tokens, call.v.shape[3]
    if state is not None and all(h in state.skip_out and state.skip_out[h].shape == (B, N, D) for h in heads):

        def fill(out, lse):
            for h in heads:
                out[:, h] = state.skip_out[h]

        return GroupPlan(mask=_empty_mask(call, len(heads)), after=fill, writes_output=True)
    logger.debug("skip heads %s have no cached output yet: computed densely", heads)
    after = None if state is None else (lambda out, lse: _store(state, heads, out))
    return GroupPlan(mask=call.full_mask(len(heads)), after=after)


def _on_dense(call: GroupCall, spec, heads, out, lse) -> None:
    if call.state is not None:
        _store(call.state, heads, out)


FAMILY = register_builtin(
    "skip",
    params={},
    checks={},
    kind="cached",
    doc="output reused from the layer's last dense pass",
    plan=_plan,
    on_dense=_on_dense,
)
