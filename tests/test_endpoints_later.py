"""The answers that wait on the spool or the upload (acks ``durable`` and ``uploaded``).

They are completed by callbacks, not by a task per request, so these check each outcome
on the callbacks themselves; the server tests check the same answers over HTTP.
"""

from __future__ import annotations

import asyncio

import orjson

from fastingest.endpoints import Answer, _durable
from fastingest.spool import SpoolError


def answered(answer: asyncio.Future[Answer]) -> tuple[int, dict]:
    assert answer.done()
    result = answer.result()
    return result.status, orjson.loads(result.body)


def test_durable_is_answered_once_the_record_is_fsynced():
    async def main():
        answer = asyncio.get_running_loop().create_future()
        _durable(answer, 3, "durable", None, None)
        assert answered(answer) == (202, {"accepted": 3, "ack": "durable"})

    asyncio.run(main())


def test_a_failed_spool_write_is_a_503():
    async def main():
        answer = asyncio.get_running_loop().create_future()
        _durable(answer, 1, "durable", None, SpoolError("spool write failed: No space left"))
        status, body = answered(answer)
        assert (status, body["error"]) == (503, "spool_unavailable")
        assert "No space left" in body["detail"]
        assert answer.result().headers == (("Retry-After", "1"),)

    asyncio.run(main())


def test_uploaded_waits_for_the_sink_and_says_when_it_was_dead_lettered():
    async def main():
        loop = asyncio.get_running_loop()
        for stored_ok, expected in (
            (True, {"accepted": 2, "ack": "uploaded"}),
            (False, {"accepted": 2, "ack": "durable", "dead_lettered": True}),
        ):
            answer, stored = loop.create_future(), loop.create_future()
            _durable(answer, 2, "uploaded", stored, None)
            await asyncio.sleep(0)
            assert not answer.done()  # durable, not yet stored
            stored.set_result(stored_ok)
            await asyncio.sleep(0)  # the upload's callback runs on the next turn
            assert answered(answer) == (202, expected)

    asyncio.run(main())


def test_an_answer_nobody_waits_for_any_more_is_left_alone():
    # aiohttp cancels the handler of a client that left, and with it the future it awaits.
    loop_errors: list[dict] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        answer = loop.create_future()
        answer.cancel()
        _durable(answer, 1, "durable", None, None)  # no InvalidStateError
        answer, stored = loop.create_future(), loop.create_future()
        _durable(answer, 1, "uploaded", stored, None)
        answer.cancel()
        stored.set_result(True)
        await asyncio.sleep(0)  # the upload's callback: no error either
        assert answer.cancelled()

    asyncio.run(main())
    assert loop_errors == []
