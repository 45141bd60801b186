"""The architecture as a contract (docs/ARCHITECTURE.md).

import-linter (``lint-imports``, configured in pyproject.toml) checks the layers of the ``sparsediff`` package
and that no sibling modules or packages import each other in a circle, at any depth -- lazy imports and
``TYPE_CHECKING`` imports included. ``kernels/`` and ``pipelines/`` install inside ``sparsediff`` but are
folders grimp does not see from a source tree; their imports are checked here from their source.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what the two attached folders may import from the rest of sparsediff (both sit at the bottom: the
#: kernels take tensors and ints; an adapter is data about a model's token layout)
ALLOWED = {
    "kernels": {"sparsediff.support"},
    "pipelines": {"sparsediff.layout", "sparsediff.support"},
}


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (it is in the test extra: pip install -e '.[test]')"
    return [exe]


def test_import_linter_contracts_are_kept():
    proc = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def _sparsediff_imports(path: Path, folder: str) -> set[str]:
    """Modules of sparsediff (outside ``folder``) that ``path`` imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level == 1:
                continue  # the folder's own modules
            else:  # ..x from kernels/pipelines (installed as sparsediff.<folder>) is sparsediff.x
                names = ["sparsediff" + (f".{node.module}" if node.module else "")]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n == "sparsediff" or n.startswith("sparsediff."):
                if not n.startswith(f"sparsediff.{folder}"):
                    found.add(n)
    return found


def test_kernels_and_pipelines_import_only_the_bottom_layer():
    for folder, allowed in ALLOWED.items():
        files = sorted((ROOT / folder).glob("*.py"))
        assert files, folder
        for f in files:
            extra = _sparsediff_imports(f, folder) - allowed
            assert not extra, f"{folder}/{f.name} imports {sorted(extra)}; allowed: {sorted(allowed)}"


def test_the_checks_catch_an_upward_import(tmp_path):
    """Negative control for the source check: an adapter importing the hooks is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from sparsediff.hooks import get_state\nfrom ..api import enable_sparse_attention\n")
    assert _sparsediff_imports(bad, "pipelines") == {"sparsediff.hooks", "sparsediff.api"}
