"""The subcommands beside fit/validate/test: listed in --help, typed flags, one-line errors."""

import pytest
from conftest import REPO

from bdh_lightning.cli import COMMANDS
from bdh_lightning.main import command_function, main


def test_every_listed_command_resolves_to_a_documented_function(capsys):
    for name in COMMANDS:
        function = command_function(name)
        assert function.__doc__ and "Args:" in function.__doc__, name
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert f"python -m bdh_lightning {name}" in capsys.readouterr().out


def test_top_level_help_lists_every_command_and_ends_in_a_sentence(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", *COMMANDS))
    assert out.rstrip().endswith(".")


def test_estimate_describes_this_machine_by_default(capsys):
    assert main(["estimate", "--config", str(REPO / "configs" / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "predicting for this machine: cpu, precision 32-true" in out and "device cpu" in out
    assert "fits" in out  # compared with this machine's memory without a --budget
    assert main(["estimate", "--config", str(REPO / "configs" / "tiny.yaml"), "--device", "cuda"]) == 0
    assert "precision bf16-mixed" in capsys.readouterr().out


def test_an_unknown_flag_is_one_line_naming_the_commands_help(capsys):
    assert main(["estimate", "--config", "x.yaml", "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "estimate --help" in err
