"""The repo's top-level folders never shadow another distribution's package (issue: Hugging Face's ``kernels``).

``kernels/`` and ``pipelines/`` sit next to ``sparsediff/`` and install as ``sparsediff.kernels`` /
``sparsediff.pipelines``. Python puts the working directory first on ``sys.path``, so a top-level folder that
is a *regular* package (has ``__init__.py``) wins over an installed distribution of the same name whenever
Python runs from the repo root -- which is how CI, ``python -m pytest`` and a user's script in a clone run.
These tests run their imports in subprocesses started from the repo root and from elsewhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, cwd: str, env: dict | None = None) -> str:
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, f"from {cwd}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _top_level_folders() -> list[str]:
    return sorted(
        d
        for d in os.listdir(ROOT)
        if os.path.isdir(os.path.join(ROOT, d)) and d.isidentifier() and not d.startswith(".")
    )


def test_no_top_level_folder_is_a_regular_package_named_like_an_installed_module():
    owned = importlib.metadata.packages_distributions()  # top-level module -> distributions
    clashes = [
        f"{d}/ (owned by {owned[d]})"
        for d in _top_level_folders()
        if d != "sparsediff" and d in owned and os.path.exists(os.path.join(ROOT, d, "__init__.py"))
    ]
    assert not clashes, f"top-level folders that shadow installed distributions from the repo root: {clashes}"
    # Stronger, and independent of what happens to be installed today: only sparsediff/ is a regular package.
    regular = [d for d in _top_level_folders() if os.path.exists(os.path.join(ROOT, d, "__init__.py"))]
    assert regular == ["sparsediff"], regular


@pytest.mark.skipif(
    importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed"
)
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_hf_kernels_and_diffusers_peft_import_with_sparsediff(where, tmp_path):
    cwd = ROOT if where == "root" else str(tmp_path)
    out = _run(
        "import diffusers.loaders.peft, sparsediff, kernels\n"
        "import sparsediff.kernels.launch, sparsediff.kernels.block_sparse_attn, sparsediff.pipelines.wan\n"
        "print(kernels.__file__)\n"
        "print(sparsediff.kernels.launch.__file__)\n"
        "print(sparsediff.pipelines.wan.__file__)\n",
        cwd,
    )
    hf, ours_k, ours_p = out.split()
    # (a venv may live inside the clone, as CI's does: compare with the repo's own top-level folder)
    repo_kernels = os.path.join(os.path.realpath(ROOT), "kernels")
    assert os.path.dirname(os.path.realpath(hf)) != repo_kernels, (
        f"`import kernels` found the repo's folder: {hf}"
    )
    assert os.path.basename(os.path.dirname(ours_k)) == "kernels", ours_k
    assert os.path.basename(os.path.dirname(ours_p)) == "pipelines", ours_p


def test_hf_kernels_is_installed_with_the_test_extra():
    # The shadowing tests above skip without it; the test extra installs it so CI always runs them.
    assert importlib.util.find_spec("kernels") is not None, "pip install -e '.[test]' should install kernels"


def test_wheel_installs_kernels_and_pipelines_inside_the_package(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info into the source folder.
    src = tmp_path / "src"
    for name in ("sparsediff", "kernels", "pipelines"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    (whl,) = wheels.glob("sparsediff-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for f in (
        "sparsediff/kernels/launch.py",
        "sparsediff/kernels/block_sparse_attn.py",
        "sparsediff/pipelines/wan.py",
    ):
        assert f in names, f"{f} missing from {whl.name}"
    assert not [n for n in names if n.split("/")[0] in ("kernels", "pipelines", "tests", "samples")], names
    # every module of the source tree is in the wheel (a subpackage missing from pyproject's list is not)
    modules = {
        "sparsediff/" + p.relative_to(src / "sparsediff").as_posix()
        for p in (src / "sparsediff").rglob("*.py")
    }
    assert not modules - set(names), f"missing from {whl.name}: {sorted(modules - set(names))}"
    assert "sparsediff/embedded/weights/sparse_plan_lora/pytorch_lora_weights.safetensors" in names
    # Install it (without dependencies: they come from this environment) into a folder and import it from
    # elsewhere: the installed copy, not this source tree, must serve sparsediff.kernels / .pipelines.
    target = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = _run(
        "import sparsediff, sparsediff.kernels.launch, sparsediff.pipelines.base\n"
        "print(sparsediff.__file__); print(sparsediff.kernels.launch.__file__); "
        "print(sparsediff.pipelines.base.__file__)\n",
        str(tmp_path),
        env,
    )
    for path in out.split():
        assert path.startswith(str(target)), f"imported {path}, not from the installed wheel in {target}"
