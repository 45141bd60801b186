"""The ``sparsediff`` command line dispatches its subcommands and reports errors with exit codes."""

import subprocess
import sys

import pytest

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


def test_compare_package_runs_as_a_module_and_through_the_dispatcher(capsys):
    r = subprocess.run(
        [sys.executable, "-m", "sparsediff.compare", "--help"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "--guidance-scale" in r.stdout and "--threads" in r.stdout
    assert "--guidance " not in r.stdout  # the deprecated spelling is accepted, not advertised


def test_markdown_table_is_printed(capsys):
    assert main(["--markdown-table"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| flag | demo | compare | search |") and "`--num-frames` → `--frames`" in out


def test_steps_zero_is_an_argparse_error_everywhere(capsys):
    for cmd in (
        ["demo"],
        ["compare"],
        ["search", "--prompts", "p.txt", "--density", "0.5", "--out", "p.json"],
        ["finetune", "--prompts", "p.txt", "--out", "ft"],
    ):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--steps", "0"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--steps: must be >= 1, got 0" in err
        assert err.count("\n") == 1 and "usage:" not in err, err  # one line, like every other bad input


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--no-such-flag"],
        ["compare", "--seeds", "x"],
        ["search", "--density", "0.5"],  # required flags missing
        ["plan", "show"],  # the subcommand's parser: PLAN missing
        ["bench", "--block-size", "-1"],
        ["finetune", "--out", "ft"],  # --prompts missing
        ["info", "--verbose"],
    ],
)
def test_usage_errors_are_one_line_and_help_still_prints_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsediff ") and ": error: " in err, err
    assert err.rstrip().endswith("(see --help)")
    with pytest.raises(SystemExit) as e:
        main([*argv[: 2 if argv[0] == "plan" else 1], "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: sparsediff ")


def test_bench_and_plan_show_keep_existing_files(tmp_path, capsys):
    import pytest

    out = tmp_path / "bench.md"
    out.write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--shapes", "128:2:16", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "mine"


@pytest.mark.parametrize("after_group", [False, True])
def test_exit_process_keeps_the_code_and_the_buffered_output(after_group):
    # After a multi-process run the tools leave with os._exit (gloo threads abort interpreter finalisation):
    # the exit code and output still buffered in the pipe must survive it.
    code = (
        "import sparsediff.loading as L; print('partial line', end=''); "
        f"L._FINISHED_PROCESS_GROUP = {after_group}; L.exit_process(3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and proc.stdout == "partial line", (
        proc.returncode,
        proc.stdout,
        proc.stderr[-500:],
    )
