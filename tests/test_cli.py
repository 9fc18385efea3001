"""The one command, sae-traits (pipeline/cli.py): each subcommand is its module's main, and --help
says what it takes. Fast, no Ray."""

import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS, main


def test_no_command_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)


def test_an_unknown_command_is_refused_naming_it(capsys):
    assert main(["biuld"]) == 2
    assert "unknown command 'biuld'" in capsys.readouterr().err


@pytest.mark.parametrize("command, sections, page", [
    ("build", ["contrast", "annotate", "ray"], "docs/build.md"),
    ("train-sae", ["sae", "train"], "docs/training.md"),
    ("export", ["format", "include_background"], "docs/export.md"),
    ("sweep", ["contrast", "annotate"], "docs/reuse.md"),
])
def test_help_lists_the_config_sections_and_the_docs_page(command, sections, page, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sae-traits {command} ")
    assert "config keys, by section" in out and all(f"\n  {s} " in out for s in sections) and page in out


def test_the_console_script_and_the_module_run_the_same_main():
    """The installed `sae-traits` entry point (pyproject's [project.scripts]) and python -m pipeline.X."""
    for argv in (["sae-traits", "cluster-check", "--help"], [sys.executable, "-m", "pipeline.cluster_check", "--help"]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "serve_configs" in proc.stdout
