# cython: language_level=3
"""The compiled bounded job queue: a ring buffer of Python objects in C memory.

Locking model (read this before changing anything below)
--------------------------------------------------------
* The ring (``ring_t``) is guarded by one pthread mutex. Everything that reads or
  writes it -- index arithmetic, byte accounting, counters, the blocking waits --
  is a ``noexcept nogil`` C helper below. Those helpers touch no Python object:
  items are stored as plain ``void*`` owned references, so a thread blocked in
  ``get()`` can take an item out of the ring without the GIL and only turns it
  back into an object once it holds the GIL again.
* Blocking ``put()``/``get()`` run their helpers inside ``with nogil:`` so a
  waiting thread never stops the rest of the interpreter.
* The non-blocking paths (``put_nowait``, ``get_nowait``, ``put_many``,
  ``get_many`` and the asyncio fast paths) call the same helpers while still
  holding the GIL. Releasing the GIL around ~20 ns of index arithmetic would
  cost more than the work and, under contention, hand the GIL to another
  thread for a whole switch interval. This is deadlock-free because no code
  ever asks for the GIL while it holds the mutex; keep it that way (in
  particular, never run Python code -- ``len()`` of a subclass, ``__del__`` --
  between ``mutex_lock`` and ``mutex_unlock``).
* ``nogil_users`` counts threads inside (or about to enter) a ``with nogil``
  section of this queue; it changes only under the GIL. While it is 0, every
  thread that can touch the ring holds the GIL, so the fast paths skip the
  mutex (``fast_lock``). A thread registers before it releases the GIL, so
  whoever comes after it takes the mutex. A build without a GIL always locks.
* Asyncio waiters are futures in Python deques, touched only under the GIL.
  A put or get wakes one waiter of the other side, on its own loop directly or
  through ``call_soon_threadsafe`` when the waker is another thread.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_New
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_RawFree, PyMem_RawMalloc
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.errno cimport ETIMEDOUT
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import collections.abc
import threading
from asyncio import get_running_loop
from asyncio.events import _get_running_loop
from collections import deque
from types import GenericAlias

from fastingest.errors import QueueClosed, QueueEmpty, QueueFull


cdef extern from "Python.h":
    # Pointer forms of two macros, so ownership moves exactly as written.
    void list_set_item_steal "PyList_SET_ITEM" (object lst, Py_ssize_t i, void* item)
    void xdecref_ptr "Py_XDECREF" (void* item)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, const void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_condattr_init(pthread_condattr_t*)
    int pthread_condattr_setclock(pthread_condattr_t*, int)
    int pthread_condattr_destroy(pthread_condattr_t*)
    int pthread_cond_init(pthread_cond_t*, const pthread_condattr_t*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_timedwait(pthread_cond_t*, pthread_mutex_t*, const timespec*)
    int pthread_cond_signal(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)


cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #define FI_GIL_SERIALISES 0
    #else
    #define FI_GIL_SERIALISES 1
    #endif
    """
    bint FI_GIL_SERIALISES


cdef extern from "_await.h":
    ctypedef object (*fi_step_fn)(object, object)
    object fi_await_init(object would_block)
    object fi_await_new(object queue, object arg, fi_step_fn fast, fi_step_fn slow)


# Result codes of the push helpers.
cdef enum:
    PUSHED = 0
    FULL = 1
    CLOSED = 2

# Threads blocked forever on the main thread wake this often to let
# KeyboardInterrupt and other signal handlers run.
cdef double _MAIN_THREAD_SLICE = 0.1


ctypedef struct ring_t:
    void** items                 # owned references, oldest at `head`
    Py_ssize_t* sizes            # bytes charged for each slot
    Py_ssize_t capacity          # maxsize
    Py_ssize_t head
    Py_ssize_t count
    Py_ssize_t nbytes            # sum of `sizes` over the held items
    Py_ssize_t max_bytes         # -1: bounded by count only
    unsigned long long enqueued
    unsigned long long dequeued
    unsigned long long rejected  # items refused because the queue was full
    Py_ssize_t high_water        # largest `count` seen
    bint closed
    Py_ssize_t get_waiters       # threads blocked in ring_wait_pop
    Py_ssize_t put_waiters       # threads blocked in ring_wait_push
    Py_ssize_t nogil_users       # threads in a nogil section of this ring; changed under the GIL
    pthread_mutex_t lock
    pthread_cond_t not_empty
    pthread_cond_t not_full


# --- C helpers: no Python API; the caller holds r.lock unless noted. ----------

cdef inline bint ring_fits(const ring_t* r, Py_ssize_t size) noexcept nogil:
    return r.count < r.capacity and (r.max_bytes < 0 or r.nbytes + size <= r.max_bytes)


cdef inline void ring_push(ring_t* r, void* item, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t tail = r.head + r.count
    if tail >= r.capacity:
        tail -= r.capacity
    r.items[tail] = item
    r.sizes[tail] = size
    r.count += 1
    r.nbytes += size
    r.enqueued += 1
    if r.count > r.high_water:
        r.high_water = r.count
    if r.get_waiters:
        pthread_cond_signal(&r.not_empty)


cdef inline void* ring_pop(ring_t* r) noexcept nogil:
    cdef void* item = r.items[r.head]
    r.items[r.head] = NULL
    r.nbytes -= r.sizes[r.head]
    r.head += 1
    if r.head == r.capacity:
        r.head = 0
    r.count -= 1
    r.dequeued += 1
    if r.put_waiters:
        if r.max_bytes < 0:
            pthread_cond_signal(&r.not_full)       # one free slot fits any one putter
        else:
            pthread_cond_broadcast(&r.not_full)    # freed bytes may fit a later putter only
    return item


cdef inline bint fast_lock(ring_t* r) noexcept:
    """GIL held: take the mutex unless the GIL alone serialises this ring; True if taken."""
    if FI_GIL_SERIALISES and r.nogil_users == 0:
        return False
    pthread_mutex_lock(&r.lock)
    return True


cdef inline int ring_try_push(ring_t* r, void* item, Py_ssize_t size, bint final) noexcept:
    """GIL held: push if there is room. The caller owns a reference for the ring.

    `final`: a refusal is the caller's last word (counted as rejected), not a
    first try before waiting.
    """
    cdef int rc
    cdef bint locked = fast_lock(r)
    if r.closed:
        rc = CLOSED
    elif ring_fits(r, size):
        ring_push(r, item, size)
        rc = PUSHED
    else:
        r.rejected += final
        rc = FULL
    if locked:
        pthread_mutex_unlock(&r.lock)
    return rc


cdef inline void* ring_try_pop(ring_t* r, bint* closed) noexcept:
    """GIL held: pop the oldest item or return NULL."""
    cdef void* item = NULL
    cdef bint locked = fast_lock(r)
    if r.count:
        item = ring_pop(r)
    closed[0] = r.closed
    if locked:
        pthread_mutex_unlock(&r.lock)
    return item


cdef int ring_wait_push(ring_t* r, void* item, Py_ssize_t size,
                        const timespec* deadline) noexcept nogil:
    """Block until there is room, the ring closes or `deadline` passes (NULL: never)."""
    cdef int rc = 0
    pthread_mutex_lock(&r.lock)
    while not r.closed and not ring_fits(r, size) and rc != ETIMEDOUT:
        r.put_waiters += 1
        if deadline == NULL:
            pthread_cond_wait(&r.not_full, &r.lock)
        else:
            rc = pthread_cond_timedwait(&r.not_full, &r.lock, deadline)
        r.put_waiters -= 1
    if r.closed:
        rc = CLOSED
    elif ring_fits(r, size):
        ring_push(r, item, size)
        rc = PUSHED
    else:
        r.rejected += 1
        rc = FULL
    pthread_mutex_unlock(&r.lock)
    return rc


cdef void* ring_wait_pop(ring_t* r, const timespec* deadline, bint* closed) noexcept nogil:
    """Block until an item arrives, the ring closes or `deadline` passes (NULL: never)."""
    cdef void* item = NULL
    cdef int rc = 0
    pthread_mutex_lock(&r.lock)
    while r.count == 0 and not r.closed and rc != ETIMEDOUT:
        r.get_waiters += 1
        if deadline == NULL:
            pthread_cond_wait(&r.not_empty, &r.lock)
        else:
            rc = pthread_cond_timedwait(&r.not_empty, &r.lock, deadline)
        r.get_waiters -= 1
    if r.count:
        item = ring_pop(r)
    closed[0] = r.closed
    pthread_mutex_unlock(&r.lock)
    return item


cdef inline void deadline_after(timespec* ts, double seconds) noexcept nogil:
    cdef long long ns
    clock_gettime(CLOCK_MONOTONIC, ts)
    ns = ts.tv_nsec + <long long>((seconds - <long long>seconds) * 1e9)
    ts.tv_sec += <long long>seconds + ns // 1000000000
    ts.tv_nsec = ns % 1000000000


cdef inline bint deadline_before(const timespec* a, const timespec* b) noexcept nogil:
    return a.tv_sec < b.tv_sec or (a.tv_sec == b.tv_sec and a.tv_nsec < b.tv_nsec)


# --- Python-level helpers (GIL held) ------------------------------------------

cdef inline Py_ssize_t item_size(object item) except -1:
    """Bytes charged for `item`: len() of bytes-like items, 0 for anything else."""
    if PyBytes_CheckExact(item):
        return PyBytes_GET_SIZE(item)
    if PyByteArray_CheckExact(item):
        return PyByteArray_GET_SIZE(item)
    if isinstance(item, memoryview):
        return (<memoryview>item).nbytes
    if isinstance(item, (bytes, bytearray)):
        return len(item)
    return 0


def _resolve(fut):
    if not fut.done():
        fut.set_result(None)


cdef bint wake_one(object waiters) except -1:
    """Wake the oldest live asyncio waiter in `waiters`; True if one was woken."""
    while waiters:
        fut = waiters.popleft()
        if fut.done():
            continue
        loop = fut.get_loop()
        if loop is _get_running_loop():
            fut.set_result(None)
        else:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:        # that loop is closed; its task is gone
                continue
        return True
    return False


cdef int wake_all(object waiters) except -1:
    while wake_one(waiters):
        pass
    return 0


cdef int abandon(object waiters, object fut) except -1:
    """A task leaves `waiters` without waiting (cancelled, or served at once): forget it,
    and pass on the wake-up it got. A future no longer in the line was taken by a waker,
    whose wake-up may still be on its way from another thread (so not done yet)."""
    try:
        waiters.remove(fut)
    except ValueError:
        wake_one(waiters)
    return 0


_MAIN_THREAD_ID = threading.main_thread().ident


cdef int wait_plan(object timeout, timespec* deadline) except -1:
    """Before a blocking wait: fill `deadline` from `timeout`; 1 if the wait is endless
    on the main thread, which then waits in slices so signal handlers can run."""
    if timeout is not None:
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        deadline_after(deadline, timeout)
        return 0
    return threading.get_ident() == _MAIN_THREAD_ID


cdef class RingQueue:
    """Bounded FIFO of Python objects, by count and optionally by bytes.

    Safe to share between threads and asyncio tasks on any number of loops.
    See the module docstring for which parts run without the GIL.
    """

    cdef ring_t r
    cdef object _getters   # deque of futures of tasks waiting for an item
    cdef object _putters   # deque of futures of tasks waiting for room

    __class_getitem__ = classmethod(GenericAlias)

    def __cinit__(self, Py_ssize_t maxsize, max_bytes=None):
        cdef pthread_condattr_t attr
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.r.items = <void**>PyMem_RawMalloc(maxsize * sizeof(void*))
        self.r.sizes = <Py_ssize_t*>PyMem_RawMalloc(maxsize * sizeof(Py_ssize_t))
        if self.r.items == NULL or self.r.sizes == NULL:
            raise MemoryError()
        self.r.capacity = maxsize
        self.r.max_bytes = -1 if max_bytes is None else max_bytes
        pthread_mutex_init(&self.r.lock, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)   # timeouts ignore wall-clock jumps
        pthread_cond_init(&self.r.not_empty, &attr)
        pthread_cond_init(&self.r.not_full, &attr)
        pthread_condattr_destroy(&attr)
        self._getters = deque()
        self._putters = deque()

    def __dealloc__(self):
        cdef Py_ssize_t i, j
        if self.r.items != NULL:
            j = self.r.head
            for i in range(self.r.count):
                xdecref_ptr(self.r.items[j])
                j += 1
                if j == self.r.capacity:
                    j = 0
            pthread_cond_destroy(&self.r.not_empty)
            pthread_cond_destroy(&self.r.not_full)
            pthread_mutex_destroy(&self.r.lock)
        PyMem_RawFree(self.r.items)
        PyMem_RawFree(self.r.sizes)

    # --- internal ---------------------------------------------------------

    cdef inline object _took(self, void* p):
        """Turn a popped owned pointer back into an object; wake a waiting putter."""
        item = <object>p      # takes a new reference...
        Py_DECREF(item)       # ...so drop the one the ring held
        if self._putters:
            wake_one(self._putters)
        return item

    cdef inline int _pushed(self) except -1:
        if self._getters:
            wake_one(self._getters)
        return 0

    cdef int _put(self, object item, Py_ssize_t size, bint final) except -1:
        """Non-blocking put; returns PUSHED, FULL or CLOSED."""
        cdef int rc
        Py_INCREF(item)
        rc = ring_try_push(&self.r, <void*>item, size, final)
        if rc == PUSHED:
            self._pushed()
        else:
            Py_DECREF(item)
        return rc

    cdef Py_ssize_t _checked_size(self, object item) except -1:
        cdef Py_ssize_t size = item_size(item)
        if self.r.max_bytes >= 0 and size > self.r.max_bytes:
            raise ValueError(
                f"item of {size} bytes can never fit max_bytes={self.r.max_bytes}")
        return size

    # --- non-blocking -----------------------------------------------------

    @cython.always_allow_keywords(False)   # METH_O/NOARGS: no keyword parsing on the hot path
    def put_nowait(self, item):
        """Add `item` or raise QueueFull / QueueClosed at once."""
        cdef int rc = self._put(item, self._checked_size(item), True)
        if rc == FULL:
            raise QueueFull()
        if rc == CLOSED:
            raise QueueClosed("queue is closed")

    @cython.always_allow_keywords(False)   # METH_O/NOARGS: no keyword parsing on the hot path
    def get_nowait(self):
        """Take the oldest item or raise QueueEmpty / QueueClosed (closed and drained)."""
        cdef bint closed
        cdef void* p = ring_try_pop(&self.r, &closed)
        if p == NULL:
            if closed:
                raise QueueClosed("queue is closed and drained")
            raise QueueEmpty()
        return self._took(p)

    def put_many(self, items):
        """Add the longest prefix of `items` that fits; return how many were taken.

        Never blocks. Raises QueueClosed if closed, ValueError (taking nothing)
        if an item alone is larger than max_bytes.
        """
        cdef list seq = items if type(items) is list else list(items)
        cdef Py_ssize_t n = len(seq), i, taken = 0
        cdef Py_ssize_t* sizes
        cdef bint closed, locked
        if n == 0:
            if self.closed:
                raise QueueClosed("queue is closed")
            return 0
        sizes = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
        if sizes == NULL:
            raise MemoryError()
        try:
            # Sizes first: len() may run Python code, which must not happen under the mutex.
            for i in range(n):
                sizes[i] = self._checked_size(seq[i])
            locked = fast_lock(&self.r)
            if not self.r.closed:
                while taken < n and ring_fits(&self.r, sizes[taken]):
                    Py_INCREF(seq[taken])
                    ring_push(&self.r, <void*>seq[taken], sizes[taken])
                    taken += 1
                self.r.rejected += n - taken
            closed = self.r.closed
            if locked:
                pthread_mutex_unlock(&self.r.lock)
        finally:
            PyMem_Free(sizes)
        if closed:
            raise QueueClosed("queue is closed")
        if taken and self._getters:
            for i in range(taken):
                if not wake_one(self._getters):
                    break
        return taken

    def get_many(self, Py_ssize_t max_items, max_bytes=None):
        """Take up to `max_items` oldest items, stopping before `max_bytes` would be passed.

        The first item is always taken, whatever its size, so a consumer always
        progresses. Never blocks: returns [] when empty, raises QueueClosed once
        closed and drained.
        """
        cdef Py_ssize_t limit = -1 if max_bytes is None else max_bytes
        cdef Py_ssize_t n = 0, nbytes = 0, want, i
        cdef void** out
        cdef bint closed
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        want = max_items if max_items < self.r.capacity else self.r.capacity
        out = <void**>PyMem_Malloc(want * sizeof(void*))
        if out == NULL:
            raise MemoryError()
        cdef bint locked = fast_lock(&self.r)
        while n < want and self.r.count:
            if n and limit >= 0 and nbytes + self.r.sizes[self.r.head] > limit:
                break
            nbytes += self.r.sizes[self.r.head]
            out[n] = ring_pop(&self.r)
            n += 1
        closed = self.r.closed
        if locked:
            pthread_mutex_unlock(&self.r.lock)
        result = PyList_New(n)
        for i in range(n):
            list_set_item_steal(result, i, out[i])   # the list takes over the ring's reference
        PyMem_Free(out)
        if n == 0 and closed:
            raise QueueClosed("queue is closed and drained")
        if n and self._putters:
            for i in range(n):
                if not wake_one(self._putters):
                    break
        return result

    # --- blocking (threads) -----------------------------------------------

    def put(self, item, timeout=None):
        """Add `item`, blocking the calling thread (GIL released) while the queue is full.

        Raises QueueFull when `timeout` seconds pass first, QueueClosed if closed.
        """
        cdef Py_ssize_t size = self._checked_size(item)
        cdef int rc = self._put(item, size, False)   # ring_wait_push counts a final refusal
        cdef timespec deadline, slice_end
        cdef bint forever = timeout is None
        cdef bint main
        if rc == FULL:
            main = wait_plan(timeout, &deadline)
            Py_INCREF(item)
            self.r.nogil_users += 1
            try:
                while True:
                    if main:
                        deadline_after(&slice_end, _MAIN_THREAD_SLICE)
                    with nogil:
                        rc = ring_wait_push(&self.r, <void*>item, size,
                                            &slice_end if main else (NULL if forever else &deadline))
                    if rc != FULL or not main:
                        break
                    PyErr_CheckSignals()
            except BaseException:
                Py_DECREF(item)
                raise
            finally:
                self.r.nogil_users -= 1
            if rc == PUSHED:
                self._pushed()
            else:
                Py_DECREF(item)
        if rc == FULL:
            raise QueueFull()
        if rc == CLOSED:
            raise QueueClosed("queue is closed")

    def get(self, timeout=None):
        """Take the oldest item, blocking the calling thread (GIL released) while empty.

        Raises QueueEmpty when `timeout` seconds pass first, QueueClosed once
        closed and drained.
        """
        cdef bint closed
        cdef void* p = ring_try_pop(&self.r, &closed)
        cdef timespec deadline, slice_end
        cdef bint forever = timeout is None
        cdef bint main
        if p == NULL and not closed:
            main = wait_plan(timeout, &deadline)
            self.r.nogil_users += 1
            try:
                while True:
                    if main:
                        deadline_after(&slice_end, _MAIN_THREAD_SLICE)
                    with nogil:
                        p = ring_wait_pop(&self.r,
                                          &slice_end if main else (NULL if forever else &deadline),
                                          &closed)
                    if p != NULL or closed or not main:
                        break
                    PyErr_CheckSignals()
            finally:
                self.r.nogil_users -= 1
        if p != NULL:
            return self._took(p)
        if closed:
            raise QueueClosed("queue is closed and drained")
        raise QueueEmpty()

    # --- asyncio ----------------------------------------------------------

    def aput(self, item):
        """Add `item`, suspending the task while the queue is full. Await it (a coroutine)."""
        return fi_await_new(self, item, _aput_fast, _aput_slow)

    def aget(self):
        """Take the oldest item, suspending the task while the queue is empty. Await it."""
        return fi_await_new(self, None, _aget_fast, _aget_slow)

    # A thread may make room (or add an item) after a task looked and before the task is
    # in the line, and then wakes nobody: so a task that found no room tries once more
    # once in the line, and leaves it (passing on any wake-up) if that try works.

    async def _aput_wait(self, item):
        cdef Py_ssize_t size = self._checked_size(item)
        cdef int rc
        while True:
            rc = self._put(item, size, False)
            if rc == FULL:
                fut = _enlist(self._putters)
                rc = self._put(item, size, False)
                if rc == FULL:
                    await _wait(self._putters, fut)
                    continue
                abandon(self._putters, fut)
            if rc == CLOSED:
                raise QueueClosed("queue is closed")
            return

    async def _aget_wait(self):
        cdef bint closed
        cdef void* p
        while True:
            p = ring_try_pop(&self.r, &closed)
            if p == NULL and not closed:
                fut = _enlist(self._getters)
                p = ring_try_pop(&self.r, &closed)
                if p == NULL and not closed:
                    await _wait(self._getters, fut)
                    continue
                abandon(self._getters, fut)
            if p != NULL:
                return self._took(p)
            raise QueueClosed("queue is closed and drained")

    async def aget_many(self, Py_ssize_t max_items, max_bytes=None):
        """Like get_many, but suspends the task until at least one item is there."""
        while True:
            items = self.get_many(max_items, max_bytes)
            if items:
                return items
            fut = _enlist(self._getters)
            try:
                items = self.get_many(max_items, max_bytes)
            except BaseException:  # closed and drained, or a bad argument
                abandon(self._getters, fut)
                raise
            if items:
                abandon(self._getters, fut)
                return items
            await _wait(self._getters, fut)

    # --- lifecycle and introspection --------------------------------------

    def close(self):
        """Refuse further puts, let gets drain what is left, wake every waiter."""
        pthread_mutex_lock(&self.r.lock)
        self.r.closed = True
        pthread_cond_broadcast(&self.r.not_empty)
        pthread_cond_broadcast(&self.r.not_full)
        pthread_mutex_unlock(&self.r.lock)
        wake_all(self._getters)
        wake_all(self._putters)

    @property
    def closed(self):
        return self._read(6) != 0

    @property
    def maxsize(self):
        return self.r.capacity

    @property
    def max_bytes(self):
        return None if self.r.max_bytes < 0 else self.r.max_bytes

    @property
    def nbytes(self):
        return self._read(1)

    cdef Py_ssize_t _read(self, int field) noexcept:
        cdef Py_ssize_t value
        cdef bint locked = fast_lock(&self.r)
        if field == 0:
            value = self.r.count
        elif field == 1:
            value = self.r.nbytes
        else:
            value = self.r.closed
        if locked:
            pthread_mutex_unlock(&self.r.lock)
        return value

    def qsize(self):
        return self._read(0)

    def __len__(self):
        return self._read(0)

    def empty(self):
        return self._read(0) == 0

    def full(self):
        """True when no further item fits by count, or (byte-bounded) no byte is left."""
        cdef bint full
        pthread_mutex_lock(&self.r.lock)
        full = not ring_fits(&self.r, 0) or (
            self.r.max_bytes >= 0 and self.r.nbytes >= self.r.max_bytes)
        pthread_mutex_unlock(&self.r.lock)
        return full

    def stats(self):
        """Counters since creation: enqueued, dequeued, rejected, high_water."""
        cdef unsigned long long enqueued, dequeued, rejected
        cdef Py_ssize_t high_water
        pthread_mutex_lock(&self.r.lock)
        enqueued, dequeued = self.r.enqueued, self.r.dequeued
        rejected, high_water = self.r.rejected, self.r.high_water
        pthread_mutex_unlock(&self.r.lock)
        return {"enqueued": enqueued, "dequeued": dequeued,
                "rejected": rejected, "high_water": high_water}

    def __repr__(self):
        return (f"<RingQueue {self.qsize()}/{self.r.capacity} items, "
                f"{self.nbytes}/{self.max_bytes} bytes{' closed' if self.closed else ''}>")


# --- asyncio steps behind fi_await_new (see _await.h) ----------------------------

_WOULD_BLOCK = object()
QueueOperation = fi_await_init(_WOULD_BLOCK)
collections.abc.Coroutine.register(QueueOperation)  # so create_task() and friends take it


cdef object _enlist(object waiters):
    """Put this task in line in `waiters`: a put or get of the other side wakes its future."""
    fut = get_running_loop().create_future()
    waiters.append(fut)
    return fut


async def _wait(waiters, fut):
    """Wait for `fut`, enlisted in `waiters`; leaving early passes its wake-up on."""
    try:
        await fut
    except BaseException:
        abandon(waiters, fut)
        raise


cdef object _aput_fast(object queue, object item):
    cdef RingQueue q = <RingQueue>queue
    cdef int rc = q._put(item, q._checked_size(item), False)
    if rc == PUSHED:
        return None
    if rc == CLOSED:
        raise QueueClosed("queue is closed")
    return _WOULD_BLOCK


cdef object _aput_slow(object queue, object item):
    return (<RingQueue>queue)._aput_wait(item)


cdef object _aget_fast(object queue, object unused):
    cdef RingQueue q = <RingQueue>queue
    cdef bint closed
    cdef void* p = ring_try_pop(&q.r, &closed)
    if p != NULL:
        return q._took(p)
    if closed:
        raise QueueClosed("queue is closed and drained")
    return _WOULD_BLOCK


cdef object _aget_slow(object queue, object unused):
    return (<RingQueue>queue)._aget_wait()
