"""Embedded model machinery: procedural data, checks, tokenizer/text encoder, pipeline save/load, training
smoke run, attention probe. All CPU, one thread, tiny configs (seconds); no trained weights needed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparsediff.embedded import (
    EmbeddedModelNotTrainedError,
    EmbeddedVideoPipeline,
    checks,
    data,
    load_embedded_pipeline,
    probe,
    tiny_random_pipeline,
)
from sparsediff.embedded.pipeline import EmbeddedModelConfig
from sparsediff.embedded.text import CaptionTextEncoder, CaptionTokenizer
from sparsediff.embedded.train import _preset, train

PROMPT = "a red circle moving left"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_config(**kw) -> EmbeddedModelConfig:
    cfg = _preset("tiny").model
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _gt_frames(batch: data.Batch) -> list[np.ndarray]:
    return [checks.to_frames(v, "CFHW11") for v in batch.video]


# ------------------------------------------------------------------------------------------------- dataset
def test_dataset_is_deterministic_and_well_formed():
    ds = data.ProceduralVideoDataset(num_frames=5, height=24, width=40, seed=7, length=20)
    a, b = ds[3], ds[3]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    assert not torch.equal(ds[3]["video"], ds[4]["video"])
    assert not torch.equal(a["video"], data.ProceduralVideoDataset(5, 24, 40, seed=8, length=20)[3]["video"])
    v = a["video"]
    assert v.shape == (3, 5, 24, 40) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    parsed = data.parse_caption(a["caption"])
    assert {k: parsed[k] for k in ("colour", "shape", "direction", "speed")} == {
        k: a[k] for k in ("colour", "shape", "direction", "speed")
    }
    with pytest.raises(IndexError):
        ds[20]


def test_caption_words_are_the_tokenizer_vocabulary():
    g = torch.Generator().manual_seed(0)
    tok = CaptionTokenizer()
    caps = data.sample_batch(64, 2, 8, 8, g).captions + data.eval_prompts(16)
    for c in caps:
        assert tok.unk_token_id not in tok.encode(c), c


@pytest.mark.parametrize("shape", [(8, 32, 32), (5, 24, 40), (16, 64, 64)])
def test_checks_pass_on_ground_truth(shape):
    g = torch.Generator().manual_seed(1)
    batch = data.sample_batch(24 if shape[1] < 64 else 8, *shape, g, distractor_prob=0.5)
    res = checks.check_videos(_gt_frames(batch), batch.captions)
    assert res.colour_rate >= 0.95 and res.direction_rate >= 0.95, res


def test_render_prompt_matches_its_caption():
    for i, prompt in enumerate(data.eval_prompts(8) + ["a white cross moving up quickly"]):
        clip = data.render_prompt(prompt, 6, 32, 48, seed=i, distractor_prob=0.5)
        assert clip.shape == (3, 6, 32, 48)
        r = checks.check_clip(checks.to_frames(clip, "CFHW11"), prompt)
        assert r.colour_ok and r.direction_ok, r


def test_checks_fail_on_wrong_prompts():
    g = torch.Generator().manual_seed(2)
    batch = data.sample_batch(24, 8, 32, 32, g)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    colours = list(data.COLOURS)
    wrong = []
    for m in batch.metadata():
        other = colours[(colours.index(m["colour"]) + 1) % len(colours)]
        wrong.append(data.caption({**m, "direction": opposite[m["direction"]], "colour": other}))
    res = checks.check_videos(_gt_frames(batch), wrong)
    assert res.colour_rate == 0.0 and res.direction_rate == 0.0, res
    # The right colour but the opposite direction: colour passes, direction fails.
    flipped = [data.caption({**m, "direction": opposite[m["direction"]]}) for m in batch.metadata()]
    res = checks.check_videos(_gt_frames(batch), flipped)
    assert res.colour_rate >= 0.95 and res.direction_rate == 0.0, res
    # A blank video has no colour and no motion.
    blank = [np.zeros((8, 32, 32, 3), np.float32)]
    assert checks.check_videos(blank, [PROMPT]).colour_rate == 0.0


# ------------------------------------------------------------------------------------------------- text
def test_tokenizer_round_trip(tmp_path):
    tok = CaptionTokenizer(max_length=8)
    out = tok([PROMPT, "", "a purple circle"])
    assert out["input_ids"].shape == (3, 8) and out["attention_mask"].shape == (3, 8)
    assert tok.decode(out["input_ids"][0]) == PROMPT
    assert out["attention_mask"][1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # "" is <bos> alone
    assert tok.decode(out["input_ids"][2]) == "a <unk> circle"
    tok.save_pretrained(tmp_path)
    tok2 = CaptionTokenizer.from_pretrained(tmp_path)
    assert tok2.id_to_token == tok.id_to_token and tok2.max_length == 8
    assert torch.equal(tok2([PROMPT])["input_ids"], tok([PROMPT])["input_ids"])


def test_text_encoder_zeroes_padding_and_round_trips(tmp_path):
    tok = CaptionTokenizer()
    torch.manual_seed(0)
    enc = CaptionTextEncoder(
        vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2, ffn_dim=32
    ).eval()
    t = tok([PROMPT, ""])
    with torch.no_grad():
        e = enc(t["input_ids"], t["attention_mask"])
    assert e.shape == (2, tok.max_length, 16) and torch.isfinite(e).all()
    assert (e[t["attention_mask"] == 0] == 0).all() and (e[1, 0] != 0).any()
    enc.save_pretrained(tmp_path)
    enc2 = CaptionTextEncoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(enc2(t["input_ids"], t["attention_mask"]), e)


# ---------------------------------------------------------------------------------------------- pipeline
def _call(pipe, **kw):
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    args.update(kw)
    return pipe(PROMPT, **args).frames


def test_pipeline_output_types_and_cfg_calls():
    pipe = tiny_random_pipeline(seed=0, config=_tiny_config())
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        pt = _call(pipe, guidance_scale=3.0)
        assert len(calls) == 4  # two denoising steps, conditional + unconditional call each (as WanPipeline)
        calls.clear()
        _call(pipe, guidance_scale=1.0)
        assert len(calls) == 2
    finally:
        h.remove()
    assert pt.shape == (1, 4, 3, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    npy = _call(pipe, output_type="np", guidance_scale=3.0)
    assert npy.shape == (1, 4, 16, 16, 3)
    np.testing.assert_allclose(npy[0], pt[0].permute(0, 2, 3, 1).numpy(), atol=1e-6)
    lat = _call(pipe, output_type="latent", num_frames=3, height=8, width=12)
    assert lat.shape == (1, 3, 3, 8, 12)
    pil = _call(pipe, output_type="pil")
    assert len(pil) == 1 and len(pil[0]) == 4 and pil[0][0].size == (16, 16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _call(pipe, height=18)


def test_pipeline_prompt_embeds_match_prompts():
    pipe = tiny_random_pipeline(seed=0, config=_tiny_config())
    ref = _call(pipe, guidance_scale=3.0)
    with torch.no_grad():
        emb, neg = pipe.encode_prompt([PROMPT]), pipe.encode_prompt([""])
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=3.0, **args).frames
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        pipe(PROMPT, prompt_embeds=emb, num_inference_steps=1)


def test_pipeline_save_load_round_trip(tmp_path):
    pipe = tiny_random_pipeline(seed=0, config=_tiny_config())
    ref = _call(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["text_encoder"] == ["sparsediff.embedded.text", "CaptionTextEncoder"]
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()
    assert pipe.tokenizer is not None  # saving left the live pipeline intact
    loaded = EmbeddedVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.tokenizer, CaptionTokenizer)
    assert loaded.config.sample_num_frames == 4
    # Same weights and seed; only kernel-level float differences (weight memory layout after loading).
    torch.testing.assert_close(_call(loaded), ref, rtol=0, atol=1e-5)
    # Differently seeded noise gives a different video (the comparison above can fail).
    assert (_call(loaded, generator=torch.Generator().manual_seed(1)) - ref).abs().max() > 1e-2


def test_load_embedded_pipeline_without_weights_explains(tmp_path):
    with pytest.raises(
        EmbeddedModelNotTrainedError, match="python -m sparsediff.embedded.train --preset gpu"
    ):
        load_embedded_pipeline(tmp_path)


def test_default_architecture_fits_the_shipping_budget():
    cfg = EmbeddedModelConfig()
    assert cfg.num_parameters() * 2 <= 10e6
    gpu = _preset("gpu")
    F, H, W = gpu.resolutions[0]
    assert math.prod((F, H // 4, W // 4)) >= 2048


def test_sparse_attention_wan_adapter_applies():
    api = pytest.importorskip("sparsediff.api")
    pipe = tiny_random_pipeline(seed=0, config=_tiny_config())
    base = _call(pipe, output_type="latent")
    handle = api.enable_sparse_attention(pipe, "radial", dense_steps=0, min_tokens=0)
    try:
        sparse = _call(pipe, output_type="latent")
    finally:
        handle.disable()
    assert torch.isfinite(sparse).all()
    assert torch.equal(_call(pipe, output_type="latent"), base)


# ---------------------------------------------------------------------------------------------- training
def test_training_smoke_run_saves_a_loadable_pipeline(tmp_path):
    cfg = _preset("tiny")
    cfg.steps = 3
    metrics = train(cfg, str(tmp_path), evaluate=False)
    assert metrics["train"]["steps"] == 3 and math.isfinite(metrics["train"]["final_loss"])
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in lines)
    assert (tmp_path / "checkpoint.pt").is_file()
    export = tmp_path / "pipeline"
    assert (export / "MODEL_CARD.md").is_file() and (export / "metrics.json").is_file()
    pipe = load_embedded_pipeline(export)
    out = pipe(
        PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).frames
    assert out.shape == (1, 4, 16, 16, 3) and np.isfinite(out).all()
    # Training moved the weights away from the zero-initialised output projection.
    assert pipe.transformer.proj_out.weight.abs().sum() > 0
    # Resume continues from the checkpoint (step 3) instead of starting over.
    resumed = train(cfg, str(tmp_path), evaluate=False, resume=True, resume_total_steps=5)
    assert resumed["train"]["steps"] == 5
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]


def test_training_with_sparse_batches_runs_them_sparse_with_the_consistency_term(tmp_path, monkeypatch):
    """The ``demo`` preset's sparse-attention batches: the forward goes through sparsediff's sparse path
    (every batch here: p = 1), the dense teacher of the consistency term does not, and the log counts them."""
    from sparsediff import attention as attention_mod

    calls = []
    real = attention_mod.sparse_attention
    monkeypatch.setattr(
        attention_mod, "sparse_attention", lambda *a, **k: calls.append(a[4]) or real(*a, **k)
    )
    cfg = _preset("tiny")
    cfg.steps = 2
    cfg.sparse_heads = [{"pattern": "tile", "params": {"window": [1, 3, 3]}}] * cfg.model.num_heads
    cfg.sparse_prob, cfg.sparse_max_sigma, cfg.sparse_consistency = 1.0, 1.0, 1.0
    cfg.sparse_recall = 0.1
    cfg.resolutions = [(4, 32, 32)]  # 4 x 8 x 8 tokens = four 4x4x4 tiles, each head keeps its own tile
    cfg.sparse_heads = [{"pattern": "tile", "params": {"window": [1, 1, 1]}}] * cfg.model.num_heads
    metrics = train(cfg, str(tmp_path), evaluate=False)
    assert math.isfinite(metrics["train"]["final_loss"])
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["sparse_batches"] == 2
    assert lines[-1]["outside_mask"] > 0  # the locality term was computed on the sparse batches' calls
    # one sparse call per layer per batch (the dense teacher's calls never reach sparse_attention)
    assert len(calls) == 2 * cfg.model.num_layers and all(s[0].pattern == "tile" for s in calls)
    cfg.sparse_heads = cfg.sparse_heads[:1]
    with pytest.raises(ValueError, match="sparse_heads"):
        train(cfg, str(tmp_path / "bad"), evaluate=False)


def _recall_specs():
    from sparsediff.specs import HeadSpec

    return [
        HeadSpec.make("tile", window=(1, 3, 3), tile=(2, 4, 4)),  # permuted (tile order)
        HeadSpec.make("radial", decay=0.2),  # natural order, rows of different lengths
        HeadSpec.make("reordered"),  # its own (frame) order
    ]


def test_plan_recall_masks_are_the_ops_masks_and_the_term_is_minus_log_mass_inside():
    """The locality term's token masks are exactly what the op computes (with uniform logits the op's output
    is the mean of the values its mask keeps), on a ragged layout with text, for permuted and natural
    heads; the term is -log(mass inside) of the sampled rows."""
    from types import SimpleNamespace

    from sparsediff import TokenLayout, sparse_attention
    from sparsediff.embedded.train import PlanRecall

    layout = TokenLayout.video(4, 8, 8, text_len=5)
    N, H, D = layout.num_tokens, 3, 8
    specs = _recall_specs()
    assert all(s.is_static for s in specs)
    rec = PlanRecall(specs, rows=64, seed=3, block_size=16)
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(1, H, N, D)
    k, v = torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g)
    masks = rec.token_masks(layout, q, k)
    assert masks.shape == (H, N, N)
    density = masks.float().mean((1, 2))
    assert (density < 0.9).all() and (density > 0.05).all()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    out = sparse_attention(q, k, v, layout, specs, block_size=16, backend="reference")
    expect = (masks.float() @ v[0]) / masks.sum(-1, keepdim=True)
    torch.testing.assert_close(out[0], expect, atol=1e-5, rtol=1e-5)

    rec(SimpleNamespace(query=q, key=k, layout=layout, scale=None))
    rows = torch.randint(N, (64,), generator=torch.Generator().manual_seed(3))
    want = -(masks[:, rows].float().sum(-1) / N).log().mean()
    torch.testing.assert_close(rec.take(), want)
    assert rec.take() is None  # taken


def test_plan_recall_term_is_zero_for_attention_inside_and_its_gradient_moves_mass_inside():
    from types import SimpleNamespace

    from sparsediff import TokenLayout
    from sparsediff.embedded.train import PlanRecall

    layout = TokenLayout.video(4, 8, 8)
    N, H = layout.num_tokens, 3
    rec = PlanRecall(_recall_specs(), rows=128, seed=0, block_size=16)
    # every query attends only itself (one-hot q = k, large logit): always inside -> term ~ 0
    eye = torch.eye(N)[None, None].expand(1, H, N, N) * 40.0
    rec(SimpleNamespace(query=eye, key=eye / 40.0, layout=layout, scale=1.0))
    assert float(rec.take()) < 1e-6
    # random attention: positive; one gradient step on q/k lowers it
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, N, 16, generator=g).requires_grad_()
    k = torch.randn(1, H, N, 16, generator=g).requires_grad_()
    terms = []
    for _ in range(2):
        rec.gen.manual_seed(0)  # the same rows both times
        rec(SimpleNamespace(query=q, key=k, layout=layout, scale=None))
        t = rec.take()
        terms.append(float(t.detach()))
        q.grad = k.grad = None
        t.backward()
        with torch.no_grad():
            q -= 0.2 * q.norm() * q.grad / q.grad.norm()
            k -= 0.2 * k.norm() * k.grad / k.grad.norm()
    assert terms[0] > 0.1 and terms[1] < terms[0] - 0.01, terms
    # per-sample weights: a zero-weight sample does not count; all zero adds nothing
    rec.sample_weight = torch.zeros(1)
    rec(SimpleNamespace(query=q.detach(), key=k.detach(), layout=layout, scale=None))
    assert rec.take() is None
    with pytest.raises(ValueError, match="static"):
        from sparsediff.specs import HeadSpec

        PlanRecall([HeadSpec.make("topp")], rows=4, seed=0)


# ------------------------------------------------------------------------------------------------- probe
def _planted(grid, kind, alpha=2.0, D=16, heads=1):
    """q, k [1, N, heads, D] whose attention is a Gaussian in 3D (local), in (h, w) only (temporal) or
    uniform (diffuse): q_i.k_j = 2a p_i.p_j - a |p_j|^2 = -a |p_i - p_j|^2 + const(i)."""
    F, H, W = grid
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    p = torch.stack([f, h, w], -1).reshape(-1, 3).float()
    if kind == "temporal":
        p[:, 0] = 0
    a = alpha * math.sqrt(D)  # undo SDPA's 1/sqrt(D)
    q = torch.zeros(p.shape[0], D)
    k = torch.zeros(p.shape[0], D)
    if kind != "diffuse":
        q[:, :3], q[:, 3] = 2 * a * p, a
        k[:, :3], k[:, 3] = p, -(p * p).sum(-1)
    return q[None, :, None].expand(1, -1, heads, D), k[None, :, None].expand(1, -1, heads, D)


@pytest.mark.parametrize("grid", [(6, 8, 10), (5, 7, 11)])
def test_probe_statistics_on_planted_heads(grid):
    N = math.prod(grid)
    qi = torch.arange(0, N, 3)
    res = {}
    for kind in ("local", "temporal", "diffuse"):
        q, k = _planted(grid, kind)
        st = probe.attention_stats(q, k, grid, query_index=qi)
        res[kind] = {n: float(v[0]) for n, v in st.items()}
        assert probe.classify(res[kind]) == kind, (kind, res[kind])
    assert res["local"]["local_ratio"] > 10 and res["local"]["local_mass"] > 0.95
    assert res["local"]["k90"] < 0.1
    assert res["temporal"]["far_same_position"] > 0.3 and res["temporal"]["same_frame"] < 0.3
    assert abs(res["diffuse"]["local_ratio"] - 1) < 1e-4 and res["diffuse"]["entropy"] > 0.999
    assert abs(res["diffuse"]["k90"] - 0.9) < 2 / N


def test_probe_recomputes_the_models_own_attention():
    pipe = tiny_random_pipeline(seed=0, config=_tiny_config(num_layers=2))
    attn = pipe.transformer.blocks[1].attn1
    seen = {}

    def pre(m, args, kwargs):
        seen["in"] = args

    def post(m, args, kwargs, out):
        seen["out"] = out

    h1 = attn.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = attn.register_forward_hook(post, with_kwargs=True)
    try:
        _call(pipe, num_inference_steps=1, guidance_scale=1.0)
    finally:
        h1.remove()
        h2.remove()
    hs, _, _, rot = seen["in"]
    q, k, v = probe.compute_qkv(attn, hs, rot)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    o = attn.to_out[0](o.transpose(1, 2).flatten(2))
    torch.testing.assert_close(o, seen["out"], rtol=1e-4, atol=1e-5)


def test_probe_pipeline_runs_on_random_init():
    pipe = tiny_random_pipeline(seed=0, config=_tiny_config(num_layers=2))
    res = probe.probe_pipeline(pipe, [PROMPT], num_inference_steps=2, max_queries=32)
    assert res.grid == (4, 4, 4) and len(res.heads) == 4
    for h in res.heads:
        vals = [h.local_ratio, h.same_frame, h.k90, h.entropy]
        assert all(math.isfinite(x) for x in vals) and 0 < h.k90 <= 1 and 0 <= h.same_frame <= 1
        assert h.local_ratio < 5  # random init is near uniform: no local head
    assert "| layer | head |" in res.table()


# ------------------------------------------------------------------------------------ coordinates, warm start
def test_coordinate_channels_are_ramps_and_reach_the_transformer():
    from sparsediff.embedded.pipeline import coord_channels_of, with_coordinates

    x = torch.zeros(2, 3, 4, 6, 8)
    y = with_coordinates(x, 3)
    assert y.shape == (2, 6, 4, 6, 8) and torch.equal(y[:, :3], x)
    t, r, c = y[0, 3], y[0, 4], y[0, 5]
    # t varies over frames only, y over rows only, x over columns only, symmetric in [-1, 1].
    assert torch.allclose(t[:, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.equal(t, t[:, :1, :1].expand_as(t)) and torch.equal(r, r[:1, :, :1].expand_as(r))
    assert torch.allclose(c[0, 0], (torch.arange(8) + 0.5) / 8 * 2 - 1) and torch.equal(
        c, c[:1, :1].expand_as(c)
    )
    with pytest.raises(ValueError, match="coord_channels"):
        with_coordinates(x, 2)
    pipe = tiny_random_pipeline(config=_tiny_config())
    assert coord_channels_of(pipe.transformer) == 3 and pipe.transformer.config.in_channels == 6
    # The coordinate channels change the prediction (they are read, not dropped): zeroing their patch
    # weights changes the output of the same call.
    z = torch.randn(1, 3, 4, 16, 16)
    e = pipe.encode_prompt(PROMPT, device="cpu")
    with torch.no_grad():
        a = pipe.transformer(with_coordinates(z, 3), timestep=torch.tensor([900.0]), encoder_hidden_states=e)[
            0
        ]
        pipe.transformer.patch_embedding.weight[:, 3:] = 0
        b = pipe.transformer(with_coordinates(z, 3), timestep=torch.tensor([900.0]), encoder_hidden_states=e)[
            0
        ]
    assert (a - b).abs().max() > 1e-4


def test_warm_start_grows_the_patch_embedding_and_keeps_the_function():
    from sparsediff.embedded.pipeline import build_pipeline, with_coordinates
    from sparsediff.embedded.train import warm_start_state

    old = build_pipeline(_tiny_config(coord_channels=0), seed=1).transformer
    with torch.no_grad():
        old.proj_out.weight.normal_()  # a non-trivial function (zero-init output would hide mistakes)
    new = build_pipeline(_tiny_config(), seed=2).transformer
    new.load_state_dict(warm_start_state(old.state_dict(), new.state_dict()))
    x, e = torch.randn(1, 3, 4, 16, 16), torch.randn(1, 12, 16)
    with torch.no_grad():
        a = old(x, timestep=torch.tensor([500.0]), encoder_hidden_states=e, return_dict=False)[0]
        b = new(
            with_coordinates(x, 3), timestep=torch.tensor([500.0]), encoder_hidden_states=e, return_dict=False
        )[0]
    torch.testing.assert_close(a, b)
    bad = dict(old.state_dict())
    bad["proj_out.weight"] = bad["proj_out.weight"][:, :-1]
    with pytest.raises(ValueError, match="proj_out.weight"):
        warm_start_state(bad, new.state_dict())


def test_product_coordinates_and_random_new_channels():
    from sparsediff.embedded.pipeline import build_pipeline, coord_channels_of, with_coordinates
    from sparsediff.embedded.train import warm_start_state

    x = torch.zeros(1, 3, 4, 6, 8)
    y = with_coordinates(x, 5)
    assert y.shape == (1, 8, 4, 6, 8)
    torch.testing.assert_close(y[:, 6], y[:, 3] * y[:, 4])  # t * y
    torch.testing.assert_close(y[:, 7], y[:, 3] * y[:, 5])  # t * x
    # the product is what tells a clip's start from its end *and* side: it flips sign with time
    assert y[0, 7, 0, 0, 0] > 0 > y[0, 7, -1, 0, 0]
    old = build_pipeline(_tiny_config(), seed=1).transformer
    new = build_pipeline(_tiny_config(coord_channels=5), seed=2).transformer
    assert coord_channels_of(new) == 5
    zero = warm_start_state(old.state_dict(), new.state_dict())["patch_embedding.weight"]
    rnd = warm_start_state(old.state_dict(), new.state_dict(), 4.0, torch.Generator().manual_seed(0))
    w = rnd["patch_embedding.weight"]
    assert torch.equal(zero[:, :6], old.state_dict()["patch_embedding.weight"]) and not zero[:, 6:].any()
    assert torch.equal(w[:, :6], zero[:, :6])
    torch.testing.assert_close(w[:, 6].norm(), torch.tensor(4.0))
    torch.testing.assert_close(w[:, 7].norm(), torch.tensor(4.0))


def test_token_codes_keep_words_apart_and_the_bag_reaches_every_position():
    tok = CaptionTokenizer()
    caps = ["a red circle moving left", "a red circle moving right"]
    t = tok(caps)
    plain = CaptionTextEncoder(vocab_size=tok.vocab_size).eval()
    coded = CaptionTextEncoder(vocab_size=tok.vocab_size, token_code_scale=1.0).eval()
    bag = CaptionTextEncoder(vocab_size=tok.vocab_size, token_code_scale=1.0, token_code_bag=True).eval()
    for enc in (coded, bag):  # same learned weights: only the codes differ
        enc.load_state_dict(plain.state_dict())
    with torch.no_grad():
        outs = {
            name: e(t["input_ids"], t["attention_mask"])
            for name, e in (("plain", plain), ("coded", coded), ("bag", bag))
        }

    def rel(x, pos):
        return float((x[0, pos] - x[1, pos]).norm() / x[0, pos].norm())

    # the direction word itself (position 5): codes make it differ by O(1)
    assert rel(outs["coded"], 5) > 0.5
    # with the bag, every valid position (here the colour word's, 2) carries the difference of the two
    # captions' words exactly: code[left] - code[right]
    extra = outs["bag"] - outs["coded"]
    left, right = tok.token_to_id["left"], tok.token_to_id["right"]
    torch.testing.assert_close(extra[0, 2] - extra[1, 2], bag.token_code[left] - bag.token_code[right])
    assert float((bag.token_code[left] - bag.token_code[right]).norm()) > 1.0
    # padding stays zero, and the codes are deterministic (rebuilt, not saved)
    assert (outs["bag"][:, 7:] == 0).all()
    assert "token_code" not in bag.state_dict()
    again = CaptionTextEncoder(vocab_size=tok.vocab_size, token_code_scale=1.0, token_code_bag=True)
    assert torch.equal(again.token_code, bag.token_code)


def test_install_replaces_the_weights_and_warns_about_the_plan_files_it_removes(tmp_path, caplog):
    import logging

    from sparsediff.embedded.train import _install

    export, weights = tmp_path / "export", tmp_path / "weights"
    for d, names in (
        (export, ["model_index.json", "MODEL_CARD.md"]),
        (weights, ["model_index.json", "sparse_plan.json"]),
    ):
        d.mkdir()
        for n in names:
            (d / n).write_text(f"{d.name}/{n}")
    (weights / "sparse_plan_lora").mkdir()
    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        removed = _install(str(export), str(weights))
    assert removed == ["sparse_plan.json", "sparse_plan_lora"]
    assert sorted(p.name for p in weights.iterdir()) == ["MODEL_CARD.md", "model_index.json"]
    assert (weights / "model_index.json").read_text() == "export/model_index.json"
    hits = [
        r for r in caplog.records if r.levelno == logging.WARNING and "sparse_plan_lora" in r.getMessage()
    ]
    assert len(hits) == 1 and "sparse_plan.json" in hits[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsediff"):  # nothing extra to remove: no warning
        assert _install(str(export), str(weights)) == []
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
