"""``sparsediff demo`` end to end at a very small size; never overwrites without --overwrite."""

from __future__ import annotations

import json

from sparsediff import demo

ARGS = [
    "--steps",
    "2",
    "--frames",
    "5",
    "--height",
    "32",
    "--width",
    "48",
    "--format",
    "gif",
    "--no-progress",
]


def test_demo_writes_videos_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *ARGS, "--plan", "tile"]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (out / summary["files"]["dense"]).stat().st_size > 0
    assert (out / summary["files"]["sparse"]).stat().st_size > 0
    assert set(summary["seconds_per_step"]) == {"dense", "sparse"}
    assert summary["density_per_layer"] and 0 < summary["mean_density_sparse_layers"] <= 1
    assert summary["psnr_sparse_vs_dense_db"] > 0
    assert "PSNR" in (out / "summary.txt").read_text()

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert demo.main(["--out", str(out), *ARGS]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert demo.main(["--out", str(out), *ARGS, "--overwrite"]) == 0
