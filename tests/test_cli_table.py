"""README's CLI table is generated from the commands' argparse parsers and must match them."""

from pathlib import Path

from sparsediff.cli import TABLE_END, TABLE_START, cli_table, command_parsers

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_table_matches_the_parsers():
    text = README.read_text(encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, (
        f"README.md lacks the {TABLE_START} / {TABLE_END} markers"
    )
    current = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n")
    assert current == cli_table().strip("\n"), (
        "README.md's CLI table differs from the parsers; regenerate it with "
        "`python -m sparsediff.cli --markdown-table` and paste the output between the cli-table markers"
    )


def test_every_command_builds_its_parser_and_shares_flag_names():
    parsers = command_parsers()
    assert set(parsers) == {"demo", "compare", "search", "plan show", "bench", "gpucheck", "finetune"}
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in parsers.items()}
    for name in ("demo", "compare", "search"):
        assert {"--frames", "--height", "--width", "--steps", "--guidance-scale", "--seeds", "--threads",
                "--overwrite", "--out", "--no-progress"} <= flags[name], name  # fmt: skip
    for name in parsers:
        assert "--overwrite" in flags[name] and "--out" in flags[name] or name == "plan show", name
