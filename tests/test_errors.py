"""errors.py's shared checks of settings: what each accepts, and each refusal word for word, in the error class the
caller asks for."""

import pytest

from bdh_lightning.errors import (
    MAX_SEED,
    ConfigError,
    DataError,
    TrainingInterrupted,
    UsageError,
    finite_float,
    non_negative_int,
    sampling_settings,
    seed_setting,
    text_bytes,
)


def refusal(call, *args, raises=ConfigError, **kwargs) -> str:
    with pytest.raises(raises) as raised:
        call(*args, **kwargs)
    assert type(raised.value) is raises
    return str(raised.value)


def test_training_interrupted_keeps_its_message_and_signal():
    stop = TrainingInterrupted("stopped by SIGTERM", 15)
    assert str(stop) == "stopped by SIGTERM" and stop.signum == 15 and stop.exit_code == 143


def test_non_negative_int():
    assert non_negative_int("a.b", 0) == 0 and non_negative_int("a.b", 7) == 7
    for bad in (-1, 1.0, True, "3", None):
        assert refusal(non_negative_int, "a.b", bad) == f"a.b must be a non-negative integer, got {bad!r}"
    message = refusal(non_negative_int, "a.b", -2, DataError, zero="0 = off", raises=DataError)
    assert message == "a.b must be a non-negative integer (0 = off), got -2"


def test_finite_float_bounds_and_messages():
    assert finite_float("t", "2.5") == 2.5 and type(finite_float("t", 3)) is float
    assert finite_float("t", 0.0, 0.0, 1.0) == 0.0 and finite_float("t", 1.0, 0.0, 1.0) == 1.0  # closed ends
    assert finite_float("t", 0.5, 0.0, 1.0, low_open=True, high_open=True) == 0.5
    assert refusal(finite_float, "t", 2, 0.0, 1.0) == "t must be in [0, 1], got 2"
    assert refusal(finite_float, "t", -0.5, 0.0, 1.0) == "t must be in [0, 1], got -0.5"
    assert refusal(finite_float, "t", 0.0, 0.0, 1.0, low_open=True) == "t must be in (0, 1], got 0.0"
    assert refusal(finite_float, "t", 1.0, 0.0, 1.0, high_open=True) == "t must be in [0, 1), got 1.0"
    assert refusal(finite_float, "t", 2, None, 1.5) == "t must be in (-inf, 1.5], got 2"
    assert refusal(finite_float, "t", 0, 1e-05, 1e20) == "t must be in [1e-05, 1e+20], got 0"
    assert refusal(finite_float, "t", -1, 0.25, None) == "t must be in [0.25, inf), got -1"
    for bad in (float("nan"), float("inf"), True, None, "abc"):
        assert (
            refusal(finite_float, "t", bad, hint=" (0 = greedy)")
            == f"t must be a finite number, got {bad!r} (0 = greedy)"
        )
    assert (
        refusal(finite_float, "t", 9, 0, 1, hint="!", error=UsageError, raises=UsageError)
        == "t must be in [0, 1], got 9!"
    )


def test_seed_setting():
    assert seed_setting("s", None) is None and seed_setting("s", 0) == 0 and seed_setting("s", MAX_SEED) == MAX_SEED
    assert MAX_SEED == 2**64 - 1
    for bad in (MAX_SEED + 1, -1, 1.5, True, "3"):
        assert refusal(seed_setting, "s", bad) == f"s must be an integer from 0 to 2**64 - 1, got {bad!r}"
    assert seed_setting("s", 10, high=10) == 10
    assert (
        refusal(seed_setting, "s", 11, DataError, high=10, raises=DataError)
        == "s must be an integer from 0 to 10, got 11"
    )


def test_text_bytes():
    assert text_bytes("p", "héllo") == "héllo".encode()
    assert text_bytes("p", "a\udcff") == b"a\xff"  # a byte the shell passed undecoded, kept
    assert refusal(text_bytes, "p", 5) == "p must be UTF-8 text, got 5"
    assert refusal(text_bytes, "p", "\ud800") == "p must be UTF-8 text, got '\\ud800'"
    assert refusal(text_bytes, "p", list(range(40))) == "p must be UTF-8 text, got " + ascii(list(range(40)))[:80]
    assert refusal(text_bytes, "p", "", DataError, raises=DataError) == "p must hold at least one byte"


def test_sampling_settings():
    for temperature, top_k, top_p in ((0, None, 1.0), (1e-4, 1, 0.01), (1e4, 256, 1)):
        assert sampling_settings("s.", temperature, top_k, top_p) is None
    too_small = "s.temperature 5e-05 is too small to divide logits by; use 0 for greedy or at least 1e-4"
    assert refusal(sampling_settings, "s.", 5e-05, None) == too_small
    assert refusal(sampling_settings, "s.", -1, None) == "s.temperature must be in [0, 10000], got -1 (0 = greedy)"
    for top_k in (0, 257, 1.0, True):
        assert (
            refusal(sampling_settings, "s.", 1.0, top_k)
            == f"s.top_k must be in 1..256 (there are 256 bytes), got {top_k!r}"
        )
    assert refusal(sampling_settings, "s.", 1.0, None, 0) == "s.top_p must be in (0, 1], got 0"
    assert refusal(sampling_settings, "s.", 1.0, None, 1.5) == "s.top_p must be in (0, 1], got 1.5"
    assert (
        refusal(sampling_settings, "", 1.0, 0, error=UsageError, raises=UsageError)
        == "top_k must be in 1..256 (there are 256 bytes), got 0"
    )
    assert (
        refusal(sampling_settings, "", 1.0, None, 0, error=UsageError, raises=UsageError)
        == "top_p must be in (0, 1], got 0"
    )
    message = refusal(sampling_settings, "", -1, None, error=UsageError, raises=UsageError)
    assert message == "temperature must be in [0, 10000], got -1 (0 = greedy)"
