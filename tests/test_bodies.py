"""bodies.parse on its own: integers at and beyond the 64-bit edge, in every body shape."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastingest.bodies import BodyError, parse

IN_RANGE = range(-(2**63), 2**64)


def _collection(n: int) -> bytes:
    return b'{"version":"1","data":[{"id":"a","n":%d}]}' % n


@given(st.integers(min_value=-(2**70), max_value=2**70) | st.integers(-(10**40), 10**40))
def test_a_re_serialised_integer_is_kept_exactly_or_refused(n):
    for body in (_collection(n), b'[{"n":%d}]' % n, b'{\n"n": %d\n}' % n):
        if n in IN_RANGE:
            assert orjson.loads(parse(body, "application/json").chunk)["n"] == n
        else:
            with pytest.raises(BodyError) as caught:
                parse(body, "application/json")
            assert caught.value.error == "integer_out_of_range"


def test_long_digit_runs_inside_strings_are_not_integers():
    payload = b'{"id":"123456789012345678901234567890","n":1}'
    assert parse(b'{"data":[' + payload + b"]}", "application/json").chunk == payload + b"\n"


def test_a_one_line_object_is_stored_as_sent_whatever_its_integers():
    body = b'{"n": 123456789012345678901234567890}'
    assert parse(body, "application/json").chunk == body + b"\n"
