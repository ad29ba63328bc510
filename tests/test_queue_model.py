"""Model-based test: RingQueue against a plain deque model (hypothesis state machine)."""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fastingest import QueueClosed, QueueEmpty, QueueFull

payloads = st.one_of(st.binary(max_size=12), st.integers(), st.none())


def size_of(item: object) -> int:
    return len(item) if isinstance(item, bytes) else 0


def machine_for(cls: type) -> type[RuleBasedStateMachine]:
    class QueueModel(RuleBasedStateMachine):
        @rule(maxsize=st.integers(1, 6), max_bytes=st.one_of(st.none(), st.integers(1, 20)))
        @precondition(lambda self: not hasattr(self, "q"))
        def create(self, maxsize, max_bytes):
            self.q = cls(maxsize, max_bytes)
            self.maxsize, self.max_bytes = maxsize, max_bytes
            self.model: deque = deque()
            self.closed = False
            self.enq = self.deq = self.rej = self.hw = 0

        def fits(self, item) -> bool:
            return len(self.model) < self.maxsize and (
                self.max_bytes is None or self.nbytes() + size_of(item) <= self.max_bytes
            )

        def nbytes(self) -> int:
            return sum(size_of(i) for i in self.model)

        def oversize(self, item) -> bool:
            return self.max_bytes is not None and size_of(item) > self.max_bytes

        @rule(item=payloads)
        @precondition(lambda self: hasattr(self, "q"))
        def put_nowait(self, item):
            if self.oversize(item):
                expected = ValueError
            elif self.closed:
                expected = QueueClosed
            elif not self.fits(item):
                expected, self.rej = QueueFull, self.rej + 1
            else:
                expected = None
                self.model.append(item)
                self.enq += 1
                self.hw = max(self.hw, len(self.model))
            try:
                self.q.put_nowait(item)
            except (ValueError, QueueClosed, QueueFull) as exc:
                assert type(exc) is expected
            else:
                assert expected is None

        @rule(items=st.lists(payloads, max_size=8))
        @precondition(lambda self: hasattr(self, "q"))
        def put_many(self, items):
            if any(self.oversize(i) for i in items):
                try:
                    self.q.put_many(items)
                except ValueError:
                    return
                raise AssertionError("expected ValueError")
            if self.closed:
                try:
                    self.q.put_many(items)
                except QueueClosed:
                    return
                raise AssertionError("expected QueueClosed")
            taken = 0
            for item in items:
                if not self.fits(item):
                    break
                self.model.append(item)
                taken += 1
                self.hw = max(self.hw, len(self.model))
            self.enq += taken
            self.rej += len(items) - taken
            assert self.q.put_many(items) == taken

        @rule()
        @precondition(lambda self: hasattr(self, "q"))
        def get_nowait(self):
            if self.model:
                self.deq += 1
                assert self.q.get_nowait() == self.model.popleft()
            else:
                expected = QueueClosed if self.closed else QueueEmpty
                try:
                    self.q.get_nowait()
                except (QueueClosed, QueueEmpty) as exc:
                    assert type(exc) is expected
                else:
                    raise AssertionError("expected an exception")

        @rule(n=st.integers(1, 8), limit=st.one_of(st.none(), st.integers(1, 20)))
        @precondition(lambda self: hasattr(self, "q"))
        def get_many(self, n, limit):
            if not self.model and self.closed:
                try:
                    self.q.get_many(n, limit)
                except QueueClosed:
                    return
                raise AssertionError("expected QueueClosed")
            want, total = [], 0
            while self.model and len(want) < n:
                s = size_of(self.model[0])
                if want and limit is not None and total + s > limit:
                    break
                total += s
                want.append(self.model.popleft())
            self.deq += len(want)
            assert self.q.get_many(n, limit) == want

        @rule()
        @precondition(lambda self: hasattr(self, "q"))
        def close(self):
            self.closed = True
            self.q.close()

        @invariant()
        def matches(self):
            if not hasattr(self, "q"):
                return
            q = self.q
            assert q.qsize() == len(q) == len(self.model)
            assert q.nbytes == self.nbytes()
            assert q.empty() == (not self.model)
            assert q.closed == self.closed
            full = len(self.model) == self.maxsize or (
                self.max_bytes is not None and self.nbytes() >= self.max_bytes
            )
            assert q.full() == full
            assert q.stats() == {
                "enqueued": self.enq,
                "dequeued": self.deq,
                "rejected": self.rej,
                "high_water": self.hw,
            }

    return QueueModel


def test_ring_queue_matches_model(RingQueue):
    run_state_machine_as_test(
        machine_for(RingQueue),
        settings=settings(max_examples=300, stateful_step_count=60, deadline=None),
    )
