"""Validation and defaults of ``udpx._options.Options`` (SPEC.md, "Options")."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpx._options import MAX_BATCH_SIZE, MAX_UDP_PAYLOAD, Options

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

#: SPEC.md's table of defaults.
SPEC_DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "max_datagram": 65535,
    "rx_queue_size": 1024,
    "tx_queue_size": 4096,
    "idle_timeout": 3600,
    "max_conns": 65536,
    "backlog": 1024,
    "reuse_port": False,
    "rcvbuf": None,
    "sndbuf": None,
    "local_addr": None,
}

#: The integer options with their inclusive bounds (None: no upper bound).
INT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "batch_size": (1, MAX_BATCH_SIZE),
    "max_datagram": (1, 65535),
    "rx_queue_size": (1, None),
    "tx_queue_size": (1, None),
    "max_conns": (1, None),
    "backlog": (1, None),
}
#: Integer options that also accept None.
OPTIONAL_INT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "rcvbuf": (1, 2**31 - 1),
    "sndbuf": (1, 2**31 - 1),
}


def names_option(name: str) -> str:
    """A ``match`` pattern: the message names the option as a whole word."""
    return rf"\b{re.escape(name)}\b"


def make(**options: Any) -> Options:
    return Options(**options)


def test_defaults_match_the_spec() -> None:
    options = Options()
    # The spec's options are all there (the set may be extended).
    assert set(SPEC_DEFAULTS) <= {field.name for field in dataclasses.fields(Options)}
    for name, default in SPEC_DEFAULTS.items():
        value = getattr(options, name)
        assert value == default, name
        if default is None or isinstance(default, bool):
            assert value is default, name


def test_options_are_frozen_and_keyword_only() -> None:
    options = Options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Options(64)  # type: ignore[call-arg]


def test_udp_payload_limits() -> None:
    assert MAX_UDP_PAYLOAD == {4: 65507, 6: 65527}


# -- invalid values -------------------------------------------------------------------------


def _invalid_cases() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = []
    for name, (low, high) in {**INT_BOUNDS, **OPTIONAL_INT_BOUNDS}.items():
        cases += [(name, value) for value in ("8", 8.0, 1.5, True, False, b"8", [8])]
        cases += [(name, 0), (name, -1), (name, low - 1)]
        if high is not None:
            cases += [(name, high + 1), (name, 10**30)]
    cases += [(name, None) for name in INT_BOUNDS]
    cases += [("idle_timeout", value) for value in (
        0, 0.0, -0.0, -1, -1e-9, math.nan, math.inf, -math.inf, True, False, "60", b"60",
        [60], complex(1, 0))]
    cases += [("rx_coalesce", value) for value in (
        -0.001, -1, 1.5, 2, math.nan, math.inf, True, False, None, "0.001", b"0", [0.001])]
    cases += [("reuse_port", value) for value in (1, 0, "yes", None)]
    cases += [("local_addr", value) for value in (
        "127.0.0.1:0", ("127.0.0.1",), ("127.0.0.1", 0, 0), (1, 0), (b"127.0.0.1", 0),
        ("127.0.0.1", "0"), ("127.0.0.1", 0.0), ("127.0.0.1", True), ("127.0.0.1", -1),
        ("127.0.0.1", 65536), ["127.0.0.1", 0], ("127.0.0.1", None), 0)]
    return cases


@pytest.mark.parametrize(("name", "value"), _invalid_cases())
def test_invalid_value_raises_value_error_naming_the_option(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=names_option(name)):
        make(**{name: value})


@pytest.mark.parametrize("value", [0, 0.0, 0.0005, 0.001, 0.25, 1, 1.0])
def test_rx_coalesce_takes_seconds_from_0_to_1(value: float) -> None:
    assert make(rx_coalesce=value).rx_coalesce == value


def test_first_invalid_option_is_named() -> None:
    # Exactly one option is named even when several are wrong.
    with pytest.raises(ValueError) as caught:
        make(batch_size=0, backlog=0)
    message = str(caught.value)
    assert ("batch_size" in message) != ("backlog" in message)


@PROPERTY_SETTINGS
@given(name=st.sampled_from(sorted({**INT_BOUNDS, **OPTIONAL_INT_BOUNDS})), data=st.data())
def test_int_options_accept_exactly_their_range(name: str, data: st.DataObject) -> None:
    low, high = {**INT_BOUNDS, **OPTIONAL_INT_BOUNDS}[name]
    value = data.draw(st.integers(min_value=-(2**40), max_value=2**40) | st.sampled_from(
        [low, low - 1, high if high is not None else 2**63, (high or 2**63) + 1]))
    valid = value >= low and (high is None or value <= high)
    if valid:
        assert getattr(make(**{name: value}), name) == value
    else:
        with pytest.raises(ValueError, match=names_option(name)):
            make(**{name: value})


@PROPERTY_SETTINGS
@given(timeout=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**64), 2**64))
def test_idle_timeout_accepts_exactly_positive_finite_numbers(timeout: float) -> None:
    if timeout > 0 and math.isfinite(timeout):
        assert make(idle_timeout=timeout).idle_timeout == timeout
    else:
        with pytest.raises(ValueError, match=names_option("idle_timeout")):
            make(idle_timeout=timeout)


def test_huge_int_idle_timeout_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=names_option("idle_timeout")):
        make(idle_timeout=10**400)


@PROPERTY_SETTINGS
@given(host=st.text(max_size=20), port=st.integers(0, 65535))
def test_local_addr_accepts_host_port_tuples(host: str, port: int) -> None:
    assert make(local_addr=(host, port)).local_addr == (host, port)


# -- valid boundaries -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("batch_size", 1), ("batch_size", MAX_BATCH_SIZE), ("max_datagram", 1),
    ("max_datagram", 65535), ("rx_queue_size", 1), ("tx_queue_size", 1), ("max_conns", 1),
    ("backlog", 1), ("idle_timeout", None), ("idle_timeout", 0.001), ("idle_timeout", 1),
    ("reuse_port", True), ("rcvbuf", 1), ("rcvbuf", 2**31 - 1), ("sndbuf", 4096),
    ("local_addr", ("::1", 0)), ("local_addr", ("127.0.0.1", 65535)),
])
def test_boundary_values_are_accepted(name: str, value: Any) -> None:
    assert getattr(make(**{name: value}), name) == value
