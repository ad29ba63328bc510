"""bodies.parse on its own: what is stored for each body shape, and integers past 64 bits."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastingest.bodies import BodyError, parse

IN_RANGE = range(-(2**63), 2**64)
INTEGERS = st.integers(min_value=-(2**70), max_value=2**70) | st.integers(-(10**40), 10**40)


@given(INTEGERS)
def test_one_line_payloads_keep_every_integer_as_sent(n):
    payload = b'{"id":"a","n":%d}' % n
    for body in (b'{"version":"1","data":[%s]}' % payload, b"[%s]" % payload, payload):
        assert parse(body, "application/json").chunk == payload + b"\n"


@given(INTEGERS)
def test_a_re_serialised_integer_is_kept_exactly_or_refused(n):
    # A payload spanning lines is re-serialised by orjson, which reads big integers as floats.
    for body in (b'{"data":[{"n":\n%d}]}' % n, b'[{"n":\n%d}]' % n, b'{\n"n": %d\n}' % n):
        if n in IN_RANGE:
            assert parse(body, "application/json").chunk == b'{"n":%d}\n' % n
        else:
            with pytest.raises(BodyError) as caught:
                parse(body, "application/json")
            assert caught.value.error == "integer_out_of_range"


def test_long_digit_runs_inside_strings_are_not_integers():
    body = b'{"data":[{"id":"123456789012345678901234567890",\n"n":1}]}'
    assert orjson.loads(parse(body, "application/json").chunk)["n"] == 1


@pytest.mark.parametrize(
    ("body", "chunk", "token"),
    [
        (b' {"data": [ {"a": 1} , {"b": [2]} ], "token": "t"} ', b'{"a": 1}\n{"b": [2]}\n', "t"),
        (b'[{"a":"\\u00e9"},{}]', b'{"a":"\\u00e9"}\n{}\n', None),
        (b'{"a": 1.5}\n', b'{"a": 1.5}\n', None),
        (b'{"token": "t", "a": 1}', b'{"token": "t", "a": 1}\n', None),  # no data: no token
        (b'{"data":[{"a":1e2}]}', b'{"a":100.0}\n', None),  # an exponent: orjson's path
        (b'{"data":[{"a":\r\n1}]}', b'{"a":1}\n', None),  # spans lines: re-serialised
    ],
)
def test_what_is_stored(body, chunk, token):
    payloads = parse(body, "application/json")
    assert (payloads.chunk, payloads.token) == (chunk, token)
