"""The ``sparsediff`` command line dispatches its subcommands and reports errors with exit codes."""

import subprocess
import sys

from sparsediff.cli import main


def test_info_lists_supported_transformers(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sparsediff 0.1.0" in out
    for cls in ("WanTransformer3DModel", "FluxTransformer2DModel", "CogVideoXTransformer3DModel"):
        assert cls in out


def test_unknown_command_and_help(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main([]) == 2


def test_console_module_runs():
    r = subprocess.run(
        [sys.executable, "-m", "sparsediff", "info"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "supported transformers" in r.stdout
