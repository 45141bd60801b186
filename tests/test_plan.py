"""Plan: JSON round trip, safe save, clear errors for corrupt files and mismatched models, config."""

from __future__ import annotations

import json

import pytest

from sparsediff.config import SparseAttentionConfig
from sparsediff.layout import TokenLayout
from sparsediff.plan import PLAN_VERSION, ModelIdentity, Plan, PlanError, PlanMismatchError
from sparsediff.specs import DenseSchedule, HeadSpec


def _ident(layers=3, heads=4, dim=16, cls="WanTransformer3DModel", config=None):
    cfg = config if config is not None else {"num_layers": layers, "num_attention_heads": heads}
    from sparsediff.plan import _config_hash

    return ModelIdentity(cls, "wan", (heads,) * layers, (dim,) * layers, _config_hash(cfg), cfg)


def _per_head_plan(ident):
    pats = [HeadSpec("dense"), HeadSpec.make("radial", decay=0.5), HeadSpec.make("tile", window=(1, 2, 2))]
    layers = [[pats[(li + h) % 3] for h in range(ident.num_heads[li])] for li in range(ident.num_layers)]
    return Plan(
        layers=tuple(map(tuple, layers)),
        model=ident,
        schedule=DenseSchedule(0.25, (0,)),
        refresh_steps=(10, 20),
        layout=TokenLayout.video(4, 6, 8),
        meta={"searched_by": "test"},
    )


def test_uniform_round_trip_and_summary():
    p = Plan.uniform("radial", dense_steps=0.2, dense_layers=[0, 1], decay=0.3)
    q = Plan.from_dict(json.loads(p.to_json()))
    assert q == p
    assert q.head_specs(5, 3) == (HeadSpec.make("radial", decay=0.3),) * 3
    assert "radial" in p.summary() and "20%" in p.summary()
    assert not p.is_all_dense and Plan.dense().is_all_dense


def test_per_head_round_trip_file(tmp_path):
    plan = _per_head_plan(_ident())
    path = plan.save(tmp_path / "plans" / "p.json")
    text = path.read_text()
    assert '"format": "sparsediff-plan"' in text and "pickle" not in text
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.layout == plan.layout and loaded.meta == {"searched_by": "test"}
    assert loaded.head_specs(1, 2, head_offset=2) == plan.layers[1][2:4]  # context-parallel slice


def test_save_never_overwrites_silently(tmp_path):
    path = tmp_path / "p.json"
    Plan.uniform("tile").save(path)
    before = path.read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Plan.uniform("radial").save(path)
    assert path.read_text() == before
    Plan.uniform("radial").save(path, overwrite=True)
    assert Plan.load(path).default.pattern == "radial"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"format": "sparsediff-plan", "version": 1, "default": ', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format": "something-else", "version": 1}', "not a sparsediff plan"),
        ('{"format": "sparsediff-plan", "version": 99}', "newer than"),
        ('{"format": "sparsediff-plan", "version": 1, "default": {"pattern": "nope"}}', "unknown pattern"),
        (
            '{"format": "sparsediff-plan", "version": 1, "default": {"pattern": "radial", "params": {"bogus": 1}}}',
            "bogus",
        ),
        ('{"format": "sparsediff-plan", "version": 1, "schedule": {"dense_steps": 3.5}}', "fraction"),
    ],
)
def test_corrupt_plan_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PlanError, match=match) as ei:
        Plan.load(path)
    assert str(path) in str(ei.value)


def test_missing_plan_file():
    with pytest.raises(FileNotFoundError, match="plan file not found"):
        Plan.load("/nonexistent/plan.json")


def test_per_head_plan_must_be_consistent():
    ident = _ident(layers=2, heads=4)
    with pytest.raises(PlanError, match="layer 1 lists 3 heads but model has 4"):
        Plan(layers=((HeadSpec("dense"),) * 4, (HeadSpec("dense"),) * 3), model=ident)


@pytest.mark.parametrize(
    "other, match",
    [
        (dict(layers=4), "layer count: plan has 3 layers, model has 4"),
        (dict(heads=8), "head count"),
        (dict(dim=32), "head dim"),
        (
            dict(cls="FluxTransformer2DModel"),
            "plan is for WanTransformer3DModel, model is FluxTransformer2DModel",
        ),
    ],
)
def test_validate_for_names_the_mismatch(other, match):
    plan = _per_head_plan(_ident())
    with pytest.raises(PlanMismatchError, match=match):
        plan.validate_for(_ident(**other))


def test_validate_for_config_difference_names_keys():
    plan = _per_head_plan(_ident(config={"num_layers": 3, "qk_norm": "rms_norm"}))
    model = _ident(config={"num_layers": 3, "qk_norm": "layer_norm"})
    with pytest.raises(PlanMismatchError, match="qk_norm: 'rms_norm' vs 'layer_norm'"):
        plan.validate_for(model)
    plan.validate_for(model, check_config=False)  # same architecture: allowed when asked
    Plan.uniform("radial").validate_for(model)  # generic plans fit every model


def test_validate_against_real_transformer():
    from tiny_pipelines import _wan_transformer

    t = _wan_transformer().eval()
    ident = ModelIdentity.of(t)
    assert ident.num_heads == (2, 2) and ident.head_dim == (16, 16)
    assert ident.transformer_class == "WanTransformer3DModel" and ident.adapter == "wan"
    Plan.per_head(t, [[HeadSpec("dense"), HeadSpec("radial")]] * 2).validate_for(t)
    wrong = Plan.per_head(_ident(layers=3, heads=2), [[HeadSpec("dense")] * 2] * 3)
    with pytest.raises(PlanMismatchError, match="layer count: plan has 3 layers, model has 2"):
        wrong.validate_for(t)


def test_overrides_and_pattern_params():
    p = _per_head_plan(_ident())
    q = p.with_overrides(dense_steps=2, dense_layers=[], pattern_params={"radial": {"decay": 0.9}})
    assert q.schedule == DenseSchedule(2, ())
    assert all(s.get("decay") == 0.9 for layer in q.layers for s in layer if s.pattern == "radial")
    assert [s.pattern for s in q.layers[0]] == [s.pattern for s in p.layers[0]]
    with pytest.raises(ValueError, match="no parameter"):
        p.with_overrides(pattern_params={"tile": {"decay": 1.0}})


def test_plan_for_other_resolution_warns_only_when_far():
    p = _per_head_plan(_ident())  # searched at 4x6x8 = 192 tokens
    assert p.check_layout(TokenLayout.video(4, 8, 8)) is None
    msg = p.check_layout(TokenLayout.video(16, 24, 32))
    assert msg and "re-derived" in msg


def test_config_validation():
    c = SparseAttentionConfig(dense_steps=0.2, pattern_params={"radial": {"decay": 0.5}})
    assert c.updated(strict=True).strict
    with pytest.raises(TypeError, match="unknown sparse-attention option"):
        c.updated(dense_step=3)
    with pytest.raises(ValueError, match="fraction"):
        SparseAttentionConfig(dense_steps=1.5)
    with pytest.raises(ValueError, match="unknown parameter"):
        SparseAttentionConfig(pattern_params={"radial": {"window": 3}})
    with pytest.raises(ValueError, match="top_p"):  # values checked at construction, not at the first call
        SparseAttentionConfig(pattern_params={"topp": {"top_p": 1.5}})
    with pytest.raises(ValueError, match="backend"):
        SparseAttentionConfig(backend="cuda")


def test_version_constant():
    assert Plan.uniform("dense").to_dict()["version"] == PLAN_VERSION


@pytest.mark.parametrize("where", ["top", "schedule"])
def test_plan_unknown_keys_are_rejected(where):
    import json

    from sparsediff.plan import Plan, PlanError

    d = json.loads(Plan.dense().to_json())
    if where == "top":
        d["shedule"] = {"dense_steps": 3}
    else:
        d["schedule"] = {"dense_steps": 2, "dense_layer": [0]}
    with pytest.raises(PlanError):
        Plan.from_dict(d)
