"""The reference docs are generated, so they cannot drift: docs/cli.md from the parser, the README's
results table from benchmarks/results/."""
from pathlib import Path

import pytest

from server.cli import build_parser, cli_reference, main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_matches_the_parser():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), \
        "docs/cli.md is stale: run `fedcondense cli-reference > docs/cli.md`"


def test_readme_results_table_matches_the_result_files():
    from benchmarks.results_table import END, START, render
    text = (ROOT / "README.md").read_text()
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == render(sorted((ROOT / "benchmarks" / "results").glob("*.json"))).strip(), \
        "the README's table is stale: run `fedcondense results-table --readme README.md`"


@pytest.mark.parametrize("command", ["demo", "condense", "student", "bench", "audit", "gateway", "checkpoints"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0 and "usage: fedcondense" in capsys.readouterr().out


def test_a_missing_dataset_is_one_clear_line(tmp_path, capsys):
    assert main(["condense", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
