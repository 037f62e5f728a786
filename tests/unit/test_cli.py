"""The ``triage`` command line: every subcommand's help, options before or after positionals, where files go."""
from __future__ import annotations

import argparse
import csv
import os
import sqlite3
from pathlib import Path

import pytest

from train.fairness.make_cohort import DEFAULT_OUT
from worker.cli import BENCHMARK_HELP, BENCHMARKS, build_parser, main


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths += _command_paths(child, (*prefix, name))
    return paths


COMMANDS = _command_paths(build_parser())


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_command_tree_includes_the_commands_that_delegate_their_arguments():
    assert {("phantoms",), ("fairness", "make-cohort"), ("bench", "encoder"), ("serve",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "triage")
def test_help_of_every_command_exits_zero_and_names_the_command(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert f"usage: {' '.join(('triage', *command))}" in " ".join(capsys.readouterr().out.split())


def test_bench_help_lists_every_benchmark_with_one_line(capsys):
    assert set(BENCHMARK_HELP) == set(BENCHMARKS)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    for name, line in BENCHMARK_HELP.items():
        assert f"{name} {line}" in listed


def test_make_cohort_options_before_or_after_the_output_file_give_the_same_cohort(tmp_path, capsys):
    assert main(["fairness", "make-cohort", str(tmp_path / "after.csv"), "--studies", "40", "--seed", "3"]) == 0
    assert main(["fairness", "make-cohort", "--studies", "40", "--seed", "3", str(tmp_path / "before.csv")]) == 0
    after, before = _rows(tmp_path / "after.csv"), _rows(tmp_path / "before.csv")
    assert len(after) == 40
    assert after == before


def test_make_cohort_writes_under_var_dir_and_never_into_the_package(tmp_path, monkeypatch, capsys):
    config = tmp_path / "triage.yaml"
    config.write_text(f"var_dir: {tmp_path / 'var'}\n")
    monkeypatch.chdir(tmp_path)
    shipped = DEFAULT_OUT.stat().st_mtime_ns
    # --config after the subcommand's own options: triage's, not make-cohort's
    assert main(["fairness", "make-cohort", "--studies", "25", "--config", str(config)]) == 0
    assert len(_rows(tmp_path / "var" / "fairness" / "synthetic_cohort.csv")) == 25
    assert DEFAULT_OUT.stat().st_mtime_ns == shipped


def test_global_options_after_the_subcommand_are_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRIAGE_CONFIG", raising=False)
    config = tmp_path / "triage.yaml"
    config.write_text(f"var_dir: {tmp_path / 'var'}\n")
    database = tmp_path / "other.db"
    assert main(["db", "upgrade", "--url", f"sqlite:///{database}", "--config", str(config), "-v"]) == 0
    with sqlite3.connect(database) as connection:
        assert connection.execute("select version_num from alembic_version").fetchone()
    assert "database at revision" in capsys.readouterr().out


def test_a_missing_configuration_file_is_named_in_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fairness", "report", "--config", str(tmp_path / "nope.yaml")])
    assert exited.value.code == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--bogus"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_console_script_runs_from_another_folder(tmp_path):
    """The real entry point, as a user runs it: options after the positional, from outside the checkout."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "worker.cli", "fairness", "make-cohort", "c.csv", "--studies", "12"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 0, result.stderr
    assert len(_rows(tmp_path / "c.csv")) == 12


def test_the_feature_command_index_lists_what_each_feature_module_registers():
    import importlib

    from worker.cli import FEATURE_COMMAND_INDEX, FEATURE_COMMANDS

    registered = {}
    for module in FEATURE_COMMANDS:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        helps = {action.dest: action.help for action in sub._choices_actions}
        registered.update({name: (module, helps[name]) for name in sub.choices if module in
                           {owner for owner, _ in FEATURE_COMMAND_INDEX.values()}})
    assert registered == FEATURE_COMMAND_INDEX


def test_top_level_help_does_not_import_dicom_database_or_model_libraries():
    import subprocess
    import sys

    probe = ("import sys\nfrom worker.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('pydicom', 'sqlalchemy', 'torch', 'numpy', 'monai') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert "usage: triage" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
