"""IP-adapter loading with sparse attention enabled (issue 11), on a tiny random-init Flux transformer.

diffusers' Flux loader (``FluxTransformer2DModel._load_ip_adapter_weights``, what ``pipe.load_ip_adapter``
calls) rebuilds every processor: single-stream blocks get ``attn_processors[name].__class__()``, dual-stream
blocks a new ``FluxIPAdapterAttnProcessor`` -- an ``nn.Module`` holding the IP projections. Before the fix
the dual-stream layers then ran that processor's own dense attention, silently (only the single-stream
layers stayed sparse), and enabling sparse attention on a model with an IP-adapter raised.

The IP-adapter weights are random and built in memory, shaped like diffusers' own
``create_flux_ip_adapter_state_dict`` test helper (no Hub access).
"""

from __future__ import annotations

import pytest
import torch
from _integration import SPARSE_KW, SPARSE_PLAN
from tiny_pipelines import _flux_transformer

import sparsediff.api as api
from sparsediff.plan import Plan

GRID = (8, 12)  # packed image tokens
TEXT = 16


def _ip_adapter_state_dict(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Random IP-adapter weights in the layout ``_load_ip_adapter_weights`` reads: one ``to_k_ip`` /
    ``to_v_ip`` pair per dual-stream block, and the image projection (4 image tokens)."""
    from diffusers.models.embeddings import ImageProjection

    cross, inner = model.config.joint_attention_dim, model.inner_dim
    n_dual = sum(1 for n in model.attn_processors if n.startswith("transformer_blocks."))
    ip = {}
    for i in range(n_dual):
        for proj in ("to_k_ip", "to_v_ip"):
            lin = torch.nn.Linear(cross, inner)
            ip[f"{i}.{proj}.weight"], ip[f"{i}.{proj}.bias"] = lin.weight.data, lin.bias.data
    img = ImageProjection(
        cross_attention_dim=cross, image_embed_dim=model.config.pooled_projection_dim, num_image_text_embeds=4
    ).state_dict()
    proj = {
        "proj.weight": img["image_embeds.weight"],
        "proj.bias": img["image_embeds.bias"],
        "norm.weight": img["norm.weight"],
        "norm.bias": img["norm.bias"],
    }
    return {"image_proj": proj, "ip_adapter": ip}


def _inputs(with_image: bool = True) -> dict:
    """One transformer call ``[16 text, 8x12 image]``; a fresh dict each time (Flux pops the image embeds)."""
    g = torch.Generator().manual_seed(1)
    h, w = GRID
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(TEXT, 3),
        return_dict=False,
    )
    embeds = torch.randn(1, 1, 32, generator=g)
    if with_image:
        inputs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [embeds]}
    return inputs


def _run(t: torch.nn.Module, **kw) -> torch.Tensor:
    with torch.no_grad():
        return t(**_inputs(**kw))[0]


def _load(t: torch.nn.Module, sd) -> None:
    t._load_ip_adapter_weights([sd], low_cpu_mem_usage=False)


def _assert_ip_processors(t: torch.nn.Module) -> None:
    """diffusers' own check (``check_if_ip_adapter_correctly_set``): the dual blocks hold IP processors."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    procs = t.attn_processors
    dual = [n for n in procs if n.startswith("transformer_blocks.")]
    assert dual and all(isinstance(procs[n], FluxIPAdapterAttnProcessor) for n in dual), procs


@pytest.mark.parametrize("order", ["load_while_enabled", "enable_after_load"])
def test_flux_ip_adapter_with_sparse_attention(order):
    torch.manual_seed(0)
    sd = _ip_adapter_state_dict(_flux_transformer())
    ref = _flux_transformer().eval()  # the untouched model with the adapter
    no_adapter = _run(ref, with_image=False)
    _load(ref, sd)
    base = _run(ref)
    assert not torch.allclose(base, no_adapter, atol=1e-4), "the IP-adapter has no effect: test is void"

    t = _flux_transformer().eval()
    n_layers = len(t.transformer_blocks) + len(t.single_transformer_blocks)
    if order == "load_while_enabled":
        h = api.enable_sparse_attention(t, Plan.dense(), backend="reference", strict=True)
        _load(t, sd)
    else:
        _load(t, sd)
        h = api.enable_sparse_attention(t, Plan.dense(), backend="reference", strict=True)
    _assert_ip_processors(t)
    assert torch.equal(_run(t), base), "dense plan with the IP-adapter != the untouched model with it"
    h.disable()
    _assert_ip_processors(t)
    assert torch.equal(_run(t), base), "disable did not restore the model with its IP-adapter"
    assert t.state_dict().keys() == ref.state_dict().keys()

    # sparse: strict, so a layer that cannot run sparse raises instead of silently running dense
    h = api.enable_sparse_attention(t, SPARSE_PLAN, **SPARSE_KW, strict=True)
    if order == "load_while_enabled":  # a second load while enabled replaces the processors again
        _load(t, sd)
    _assert_ip_processors(t)
    sparse = _run(t)
    rep = h.report()["transformer"]
    h.disable()
    assert rep["sparse_calls"] == n_layers, rep  # every self-attention layer, dual-stream ones included
    assert sorted(rep["densities"]) == list(range(n_layers)), rep
    assert all(0 < d < 1 for d in rep["densities"].values()), rep
    assert torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, base, atol=1e-4), "the sparse plan did not change the output"
    assert torch.equal(_run(t), base)
