"""`python -m bdh_lightning`: dispatch to a subcommand, and the one place where errors become one line.

fit, validate and test are LightningCLI's (cli.py); the others (cli.COMMANDS) are typed functions whose
parsers jsonargparse builds from their signatures and docstrings.
"""

from __future__ import annotations

import inspect
import pkgutil
import sys

from jsonargparse import ArgumentError, ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException

from .cli import BDHCLI, COMMANDS
from .console import abandon_stdout, quiet, say
from .errors import BDHError, one_line
from .faults import OUT_OF_MEMORY, is_out_of_memory, peer_stopped, watch_started_ranks


def command_function(name: str):
    return pkgutil.resolve_name(COMMANDS[name][0])  # "module:function"


def bare_flags(function, argv: list[str]) -> list[str]:
    """`--raw` alone for a bool parameter means `--raw true` (jsonargparse wants the value)."""
    parameters = inspect.signature(function).parameters
    flags = {f"--{name}" for name, p in parameters.items() if p.annotation in (bool, "bool")}
    given = []
    for i, arg in enumerate(argv):
        given.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            given.append("true")
    return given


def run_command(name: str, argv: list[str]) -> int:
    """Parse argv against the command's signature and call it."""
    function = command_function(name)
    parser = ArgumentParser(
        prog=f"python -m bdh_lightning {name}", exit_on_error=False, description=function.__doc__.split("\n\n")[0]
    )
    parser.add_function_arguments(function, as_group=False)
    init = parser.instantiate_classes(parser.parse_args(bare_flags(function, argv)))
    return function(**{k: v for k, v in vars(init).items() if not k.startswith("__")})


# What gloo and NCCL say when the process at the other end of a collective has gone (killed, crashed), as our
# line words it (matched ignoring case).
PEER_LOST_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "remote worker crashing",
    "broken pipe",
    "NCCL communicator was aborted",
)


def peer_lost(error: BaseException) -> str | None:
    """What gloo or NCCL said, if `error` says the process at the other end of a collective has gone."""
    said = str(error).lower()
    return next((marker for marker in PEER_LOST_MARKERS if marker.lower() in said), None)


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 done, 2 a user mistake, 1 a failure of the run (non-finite loss, out of memory),
    128 + N stopped by signal N."""
    from_shell = argv is None  # LightningCLI warns when given args that duplicate sys.argv
    argv = sys.argv[1:] if from_shell else list(argv)
    if "--no_quiet" not in argv:
        quiet()
    try:
        if argv and argv[0] in COMMANDS:
            return run_command(argv[0], argv[1:])
        watch_started_ranks()
        BDHCLI(args=None if from_shell else argv)
    except ArgumentError as error:
        command = f"{argv[0]} --help" if argv and (argv[0] in COMMANDS or argv[0] in BDHCLI.subcommands()) else "--help"
        say(f"error: {one_line(error)} (see {command})")
        return 2
    except BDHError as error:
        say(f"error: {one_line(error)}" if 0 < error.exit_code < 128 else one_line(error))
        return error.exit_code
    except MisconfigurationException as error:
        say(f"error: {one_line(error)}")
        return 2
    except RuntimeError as error:  # torch's allocator, or cuBLAS/cuDNN/NCCL failing to get memory: one line
        lost = peer_lost(error)
        if lost:
            say(f"error: {peer_stopped(lost)}")
            return 1
        if not is_out_of_memory(error):
            raise
        say(f"error: {OUT_OF_MEMORY}")
        return 1
    except MemoryError:  # Python's own allocations (torch's CPU allocator raises RuntimeError, above)
        say(f"error: {OUT_OF_MEMORY}")
        return 1
    except BrokenPipeError:  # the reader went away (`| head`): end quietly, as other Unix tools do
        abandon_stdout()
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    return 0
