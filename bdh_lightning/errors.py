"""One error model: every failure a user can fix is a `BDHError` with a one-line message and an exit code.

`cli.main` is the one place that catches them and prints `error: <message>`. Library code raises the
subclass that says what kind of thing went wrong; the shared validators below keep the wording of
"must be a positive integer" and friends the same everywhere.
"""

from __future__ import annotations

import math


class BDHError(Exception):
    """A failure the user can act on: `str(error)` is one line saying what is wrong and what to do."""

    exit_code = 2


class ConfigError(BDHError, ValueError):
    """A setting that cannot work; the message names the setting and the rule."""


class UsageError(BDHError, ValueError):
    """A bad command-line argument or a missing file the command was pointed at."""


class DataError(BDHError, ValueError):
    """A corpus problem: missing, unreadable, too small, changed under the run."""


class CheckpointError(BDHError, ValueError):
    """A checkpoint or weights file that cannot be used, and why."""


class ResourceError(BDHError, RuntimeError):
    """The machine ran out of something: memory, disk space."""

    exit_code = 1


class NonFiniteError(BDHError, RuntimeError):
    """Training produced a NaN or infinite loss or weights; the message names the step and the last good checkpoint."""

    exit_code = 1


class NothingToDo(BDHError):
    """The command has nothing to do (a resume already at max_steps): said in one line, exit 0."""

    exit_code = 0


class TrainingInterrupted(BDHError):
    """SIGTERM or Ctrl-C stopped the command (after saving a checkpoint, when training); exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:  # the shell's convention for "ended by this signal"
        return 128 + self.signum


def one_line(error: BaseException | str) -> str:
    """A message folded onto one line (framework errors sometimes span several)."""
    return " ".join(str(error).split())


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value, error: type[BDHError] = ConfigError) -> int:
    if not is_int(value) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value, error: type[BDHError] = ConfigError, zero: str = "") -> int:
    if not is_int(value) or value < 0:
        meaning = f" ({zero})" if zero else ""
        raise error(f"{name} must be a non-negative integer{meaning}, got {value!r}")
    return value


def finite_float(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[BDHError] = ConfigError,
    hint: str = "",
) -> float:
    """`value` as a float inside [low, high] (open ends where asked); NaN and infinities are refused."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise error(f"{name} must be a finite number, got {value!r}{hint}")
    bad_low = low is not None and (number <= low if low_open else number < low)
    bad_high = high is not None and (number >= high if high_open else number > high)
    if bad_low or bad_high:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else format(low, 'g')}, {'inf' if high is None else format(high, 'g')}{right}"
        raise error(f"{name} must be in {span}, got {value!r}{hint}")
    return number


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def seed_setting(name: str, value, error: type[BDHError] = ConfigError, high: int = MAX_SEED):
    """A sampling or run seed: None, or an integer in 0..high."""
    if value is not None and (not is_int(value) or not 0 <= value <= high):
        top = "2**64 - 1" if high == MAX_SEED else str(high)
        raise error(f"{name} must be an integer from 0 to {top}, got {value!r}")
    return value


def text_bytes(name: str, value, error: type[BDHError] = ConfigError) -> bytes:
    """Text a sampler reads as bytes: UTF-8, with bytes the shell passed undecoded kept as they were; not empty."""
    try:
        data = value.encode("utf-8", errors="surrogateescape")
    except (AttributeError, UnicodeEncodeError):
        raise error(f"{name} must be UTF-8 text, got {ascii(value)[:80]}") from None
    if not data:
        raise error(f"{name} must hold at least one byte")
    return data


def sampling_settings(prefix: str, temperature, top_k, top_p=1.0, error: type[BDHError] = ConfigError) -> None:
    """The rules every sampler shares (the `generate` command, the training sample, inspect)."""
    finite_float(f"{prefix}temperature", temperature, 0.0, 1e4, error=error, hint=" (0 = greedy)")
    if 0 < float(temperature) < 1e-4:
        raise error(
            f"{prefix}temperature {temperature!r} is too small to divide logits by; use 0 for greedy or at least 1e-4"
        )
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k <= 256):
        raise error(f"{prefix}top_k must be in 1..256 (there are 256 bytes), got {top_k!r}")
    finite_float(f"{prefix}top_p", top_p, 0.0, 1.0, low_open=True, error=error)
