/* A lazy, coroutine-compatible awaitable for RingQueue.aget()/aput().
 *
 * Nothing happens until it is first sent to (awaited, or stepped by a Task), exactly
 * like a coroutine. Then it tries the queue's non-blocking path through `fast`; if
 * that would block, it starts the waiting coroutine from `slow` and forwards
 * send/throw/close to it. The ready case costs no coroutine object, no await
 * wrapper and no StopIteration: am_send returns the value directly. */
#include <Python.h>

typedef PyObject *(*fi_step_fn)(PyObject *queue, PyObject *arg);

typedef struct {
    PyObject_HEAD
    PyObject *queue;
    PyObject *arg;       /* the item for aput(); None for aget() */
    fi_step_fn fast;     /* a new reference: the result, or fi_would_block; NULL + error */
    fi_step_fn slow;     /* the coroutine that waits */
    PyObject *inner;     /* that coroutine, once started */
    int done;
} FiAwait;

static PyObject *fi_would_block = NULL;
static PyTypeObject FiAwait_Type;

static void FiAwait_dealloc(FiAwait *self) {
    Py_XDECREF(self->queue);
    Py_XDECREF(self->arg);
    Py_XDECREF(self->inner);
    PyObject_Free(self);
}

static PyObject *FiAwait_await(PyObject *self) {
    Py_INCREF(self);
    return self;
}

static PySendResult FiAwait_am_send(FiAwait *self, PyObject *value, PyObject **result) {
    PySendResult status;
    if (self->inner == NULL) {
        PyObject *r;
        if (self->done) {
            PyErr_SetString(PyExc_RuntimeError, "cannot reuse an already awaited queue operation");
            return PYGEN_ERROR;
        }
        r = self->fast(self->queue, self->arg);
        if (r == NULL) {
            self->done = 1;
            return PYGEN_ERROR;
        }
        if (r != fi_would_block) {
            self->done = 1;
            *result = r;
            return PYGEN_RETURN;
        }
        Py_DECREF(r);
        self->inner = self->slow(self->queue, self->arg);
        if (self->inner == NULL) {
            self->done = 1;
            return PYGEN_ERROR;
        }
    }
    status = PyIter_Send(self->inner, value, result);
    if (status != PYGEN_NEXT) {
        self->done = 1;
        Py_CLEAR(self->inner);
    }
    return status;
}

/* The Python-level protocol (send/__next__) reports a return as StopIteration(value). */
static PyObject *fi_finish(PySendResult status, PyObject *result) {
    if (status == PYGEN_NEXT) return result;
    if (status == PYGEN_RETURN) {
        if (result == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        } else {
            PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (exc != NULL) {
                PyErr_SetObject(PyExc_StopIteration, exc);
                Py_DECREF(exc);
            }
        }
        Py_DECREF(result);
    }
    return NULL;
}

/* The step runs before fi_finish reads `result`: C leaves the order in which a call's
 * arguments are evaluated open, and gcc read the still-NULL `result` first when the two
 * were one call's arguments. */
static PyObject *FiAwait_iternext(FiAwait *self) {
    PyObject *result = NULL;
    PySendResult status = FiAwait_am_send(self, Py_None, &result);
    return fi_finish(status, result);
}

static PyObject *FiAwait_send(FiAwait *self, PyObject *value) {
    PyObject *result = NULL;
    PySendResult status = FiAwait_am_send(self, value, &result);
    return fi_finish(status, result);
}

static PyObject *FiAwait_throw(FiAwait *self, PyObject *args) {
    PyObject *typ = NULL, *val = NULL, *tb = NULL;
    if (self->inner != NULL) {
        PyObject *meth = PyObject_GetAttrString(self->inner, "throw");
        PyObject *r;
        if (meth == NULL) return NULL;
        r = PyObject_Call(meth, args, NULL);
        Py_DECREF(meth);
        if (r == NULL) {
            self->done = 1;
            Py_CLEAR(self->inner);
        }
        return r;
    }
    /* Never started: nothing was taken; raise what was thrown in, like a fresh coroutine. */
    self->done = 1;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb)) return NULL;
    if (PyExceptionInstance_Check(typ)) {
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    } else if (val != NULL && val != Py_None) {
        PyErr_SetObject(typ, val);
    } else {
        PyErr_SetNone(typ);
    }
    return NULL;
}

static PyObject *FiAwait_close(FiAwait *self, PyObject *unused) {
    self->done = 1;
    if (self->inner != NULL) {
        PyObject *r = PyObject_CallMethod(self->inner, "close", NULL);
        Py_CLEAR(self->inner);
        return r;
    }
    Py_RETURN_NONE;
}

static PyMethodDef FiAwait_methods[] = {
    {"send", (PyCFunction)FiAwait_send, METH_O, NULL},
    {"throw", (PyCFunction)FiAwait_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)FiAwait_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods FiAwait_async = {
    (unaryfunc)FiAwait_await, 0, 0, (sendfunc)FiAwait_am_send,
};

static PyTypeObject FiAwait_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastingest._queue.QueueOperation",
    .tp_basicsize = sizeof(FiAwait),
    .tp_dealloc = (destructor)FiAwait_dealloc,
    .tp_as_async = &FiAwait_async,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An awaitable queue operation; behaves as a coroutine.",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)FiAwait_iternext,
    .tp_methods = FiAwait_methods,
};

static PyObject *fi_await_init(PyObject *would_block) {
    if (PyType_Ready(&FiAwait_Type) < 0) return NULL;
    Py_INCREF(would_block);
    fi_would_block = would_block;
    Py_INCREF((PyObject *)&FiAwait_Type);
    return (PyObject *)&FiAwait_Type;
}

static PyObject *fi_await_new(PyObject *queue, PyObject *arg, fi_step_fn fast, fi_step_fn slow) {
    FiAwait *self = PyObject_New(FiAwait, &FiAwait_Type);
    if (self == NULL) return NULL;
    Py_INCREF(queue);
    Py_INCREF(arg);
    self->queue = queue;
    self->arg = arg;
    self->fast = fast;
    self->slow = slow;
    self->inner = NULL;
    self->done = 0;
    return (PyObject *)self;
}
