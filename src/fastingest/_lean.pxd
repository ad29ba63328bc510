# Compiles _lean.py into typed extension classes (Cython "augmenting .pxd"): one
# source, run as plain Python when there is no compiler. The attributes are C fields and
# the per-request calls between the two classes are C calls; the llhttp callbacks stay
# Python methods because httptools calls them by name.

cdef class _Slot:
    cdef public object answer
    cdef public str route
    cdef public bint keep_alive
    cdef public bint head


cdef class LeanFront:
    cdef public object endpoints
    cdef public double grace, keepalive_timeout, request_timeout
    cdef public set connections
    cdef public bint draining
    cdef public bytes date
    cdef object _server, _ticker
    cdef dict _counters, _rendered
    cdef list _outbox

    cpdef outbox(self, Connection conn)
    cpdef bytes render(self, object answer, bint keep_alive, bint head)


cdef class Connection:
    cdef public LeanFront front
    cdef public object endpoints, loop, transport, parser, answers
    cdef public double deadline
    cdef set _paused
    cdef bint _done, _closing, _in_head, _mid_request, _head
    cdef list _out, _body
    cdef Py_ssize_t _head_bytes, _head_size, _body_size, _after_head, _chunks, _held
    cdef Py_ssize_t _fields, _made
    cdef double _stalled
    cdef bytes _rest
    cdef bint _refused_at_once, _lingering
    cdef object _upgrade
    cdef bint _sized
    cdef bytes _url
    cdef dict _headers
    cdef str _route, _ack
    cdef object _refused

    cpdef _reset(self)
    cpdef _feed(self, bytes data)
    cpdef _parse(self, bytes data)
    cpdef _reply(self, object answer, str route, bint keep_alive, bint head)
    cpdef _write(self, object answer, str route, bint keep_alive, bint head)
    cpdef _send(self, bytes data)
    cpdef send_now(self)
