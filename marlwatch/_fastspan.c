/* The span hot path in C: `with span:` enters and leaves without running Python bytecode.
 *
 * Why C: inside a training loop, torch and the environment push the interpreter's code and data
 * for a Python `__enter__`/`__exit__` out of the CPU caches between two spans, so a span that
 * costs ~0.5 us in a tight loop costs ~2 us in MADDPG's rollout (bench/overhead.py, in-situ row).
 * Two C calls touch far less memory. `marlwatch/instrument.py` holds the reference
 * implementation in Python, used where this module is not built; tests run both.
 *
 * Layout (same as the Python one): the caller's four preallocated `array.array` buffers
 * (ids, parents: int32; t0, t1: int64) are filled in place, `n` counts the spans in them, and a
 * stack of (phase id, start time) frames gives each span its parent. When the buffers are full,
 * or a span ends past the `ship_at` deadline, `on_full(buffer)` (Telemetry._ship) ships them and
 * resets `n`.
 *
 * Threads: a SpanBuffer records the spans of one thread (its `owner`). The buffer a Telemetry
 * makes first is the root; Span objects point at it, and a span entered or ended in another
 * thread goes to that thread's own buffer, got once from the root's `for_thread()` and cached in
 * the root's `threads` dict (the reference that keeps it alive) and in a C thread-local (the fast
 * path). So each thread nests on its own stack, and the owner's path costs one compare.
 *
 * Clock: CLOCK_MONOTONIC, which is what time.perf_counter_ns() reads on Linux; instrument.py
 * checks that the two agree before using this module. Other platforms use the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>

/* Bumped whenever the Python side's calls change: instrument.py refuses a stale build (an
   in-place .so left from an older checkout) and uses the Python spans instead of crashing. */
#define FASTSPAN_ABI 2

#ifndef __linux__
#error "the C span path is built on Linux only; elsewhere marlwatch uses its Python spans"
#endif

static inline int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

typedef struct {
    int32_t id;
    int64_t t0;
} Frame;

/* ------------------------------------------------------------------------------ SpanBuffer */

typedef struct {
    PyObject_HEAD
    Py_buffer views[4]; /* ids, parents, t0, t1 */
    int32_t *ids, *parents;
    int64_t *t0, *t1;
    Py_ssize_t n, capacity;
    Frame *stack;
    Py_ssize_t depth, stack_capacity;
    PyObject *on_full;
    int64_t ship_at;       /* a span ending at or after this time ships the buffer */
    unsigned long owner;   /* the thread whose spans this buffer records */
    uint64_t gen;          /* unique per buffer: keys the thread-local cache */
    PyObject *for_thread;  /* root only: makes the calling thread's buffer */
    PyObject *threads;     /* root only: {thread ident: SpanBuffer} of the other threads */
} SpanBuffer;

static PyTypeObject SpanBufferType;
static uint64_t next_gen = 1; /* under the GIL */

/* The buffer the calling thread used last, and the generation of the root it belongs to. The
 * pointer is borrowed: the root's `threads` dict holds the buffer until `forget` drops it, and
 * `forget` clears this cache in the thread that owns it. */
static __thread uint64_t tls_gen;
static __thread SpanBuffer *tls_buf;

static int
SpanBuffer_init(SpanBuffer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ids", "parents", "t0", "t1", "on_full", "for_thread", NULL};
    PyObject *arrays[4], *on_full, *for_thread = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|O", kwlist, &arrays[0], &arrays[1], &arrays[2],
                                     &arrays[3], &on_full, &for_thread))
        return -1;
    if (self->on_full != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SpanBuffer is already initialised");
        return -1;
    }
    static const char *formats[4] = {"i", "i", "q", "q"};
    static const Py_ssize_t itemsizes[4] = {4, 4, 8, 8};
    Py_ssize_t capacity = -1;
    int acquired = 0; /* views to release if this fails */
    for (; acquired < 4; acquired++) {
        int k = acquired;
        if (PyObject_GetBuffer(arrays[k], &self->views[k], PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
            goto fail;
        Py_buffer *v = &self->views[k];
        Py_ssize_t len = v->len / itemsizes[k];
        if (v->itemsize != itemsizes[k] || strcmp(v->format, formats[k]) != 0 ||
            (capacity >= 0 && len != capacity)) {
            acquired++;
            PyErr_SetString(PyExc_TypeError,
                            "SpanBuffer wants array('i') ids and parents, array('q') t0 and t1, of one length");
            goto fail;
        }
        capacity = len;
    }
    if (capacity < 1 || !PyCallable_Check(on_full) || (for_thread != Py_None && !PyCallable_Check(for_thread))) {
        PyErr_SetString(PyExc_ValueError,
                        "SpanBuffer wants non-empty arrays, a callable on_full and for_thread callable or None");
        goto fail;
    }
    self->ids = self->views[0].buf;
    self->parents = self->views[1].buf;
    self->t0 = self->views[2].buf;
    self->t1 = self->views[3].buf;
    self->capacity = capacity;
    self->n = 0;
    self->stack_capacity = 32;
    self->stack = PyMem_Malloc(sizeof(Frame) * self->stack_capacity);
    if (self->stack == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    self->depth = 0;
    if (for_thread != Py_None) {
        self->threads = PyDict_New();
        if (self->threads == NULL) {
            PyMem_Free(self->stack);
            self->stack = NULL;
            goto fail;
        }
        Py_INCREF(for_thread);
        self->for_thread = for_thread;
    }
    self->ship_at = INT64_MAX;
    self->owner = PyThread_get_thread_ident();
    self->gen = next_gen++;
    Py_INCREF(on_full);
    self->on_full = on_full;
    return 0;

fail:
    for (int j = 0; j < acquired; j++)
        PyBuffer_Release(&self->views[j]);
    return -1;
}

static int
SpanBuffer_traverse(SpanBuffer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_full);
    Py_VISIT(self->for_thread);
    Py_VISIT(self->threads);
    for (int k = 0; k < 4; k++)
        Py_VISIT(self->views[k].obj);
    return 0;
}

static int
SpanBuffer_clear(SpanBuffer *self)
{
    Py_CLEAR(self->on_full);
    Py_CLEAR(self->for_thread);
    Py_CLEAR(self->threads);
    return 0;
}

static void
SpanBuffer_dealloc(SpanBuffer *self)
{
    PyObject_GC_UnTrack(self);
    if (self->stack != NULL) {
        for (int k = 0; k < 4; k++)
            PyBuffer_Release(&self->views[k]);
        PyMem_Free(self->stack);
        self->stack = NULL;
    }
    SpanBuffer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
SpanBuffer_get_depth(SpanBuffer *self, void *closure)
{
    return PyLong_FromSsize_t(self->depth);
}

static PyObject *
SpanBuffer_get_n(SpanBuffer *self, void *closure)
{
    return PyLong_FromSsize_t(self->n);
}

static int
SpanBuffer_set_n(SpanBuffer *self, PyObject *value, void *closure)
{
    Py_ssize_t n = value == NULL ? -1 : PyLong_AsSsize_t(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 0 || n > self->capacity) {
        PyErr_SetString(PyExc_ValueError, "n must be between 0 and the capacity");
        return -1;
    }
    self->n = n;
    return 0;
}

static PyObject *
SpanBuffer_get_ship_at(SpanBuffer *self, void *closure)
{
    return PyLong_FromLongLong(self->ship_at);
}

static int
SpanBuffer_set_ship_at(SpanBuffer *self, PyObject *value, void *closure)
{
    long long t = value == NULL ? -1 : PyLong_AsLongLong(value);
    if (t == -1 && PyErr_Occurred())
        return -1;
    self->ship_at = t;
    return 0;
}

static PyObject *
SpanBuffer_get_owner(SpanBuffer *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->owner);
}

static PyObject *
SpanBuffer_get_threads(SpanBuffer *self, void *closure)
{
    if (self->threads == NULL)
        return PyDict_New();
    return PyDict_Copy(self->threads);
}

static PyObject *
SpanBuffer_get_array(SpanBuffer *self, void *closure)
{
    if (self->on_full == NULL && self->stack == NULL) {
        PyErr_SetString(PyExc_ValueError, "the SpanBuffer is not initialised");
        return NULL;
    }
    return Py_NewRef(self->views[(intptr_t)closure].obj);
}

static PyGetSetDef SpanBuffer_getset[] = {
    {"ids", (getter)SpanBuffer_get_array, NULL, "the phase id of each span (array('i'))", (void *)0},
    {"parents", (getter)SpanBuffer_get_array, NULL, "the parent phase id of each span (array('i'))", (void *)1},
    {"t0", (getter)SpanBuffer_get_array, NULL, "the start of each span (array('q'))", (void *)2},
    {"t1", (getter)SpanBuffer_get_array, NULL, "the end of each span (array('q'))", (void *)3},
    {"n", (getter)SpanBuffer_get_n, (setter)SpanBuffer_set_n, "spans in the buffers, not yet shipped", NULL},
    {"depth", (getter)SpanBuffer_get_depth, NULL, "spans open now", NULL},
    {"ship_at", (getter)SpanBuffer_get_ship_at, (setter)SpanBuffer_set_ship_at,
     "a span ending at or after this perf_counter_ns time ships the buffer", NULL},
    {"owner", (getter)SpanBuffer_get_owner, NULL, "ident of the thread whose spans this buffer records", NULL},
    {"threads", (getter)SpanBuffer_get_threads, NULL, "root only: a copy of {thread ident: buffer}", NULL},
    {NULL},
};

/* The calling thread's buffer under `root` (the root itself in its owner thread). NULL with an
 * exception set if `for_thread` failed. */
static SpanBuffer *
thread_buffer_slow(SpanBuffer *root, unsigned long me)
{
    PyObject *key = PyLong_FromUnsignedLong(me);
    if (key == NULL)
        return NULL;
    PyObject *b = PyDict_GetItemWithError(root->threads, key); /* borrowed */
    if (b == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return NULL;
        }
        b = PyObject_CallNoArgs(root->for_thread);
        if (b == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        if (!Py_IS_TYPE(b, &SpanBufferType) || ((SpanBuffer *)b)->on_full == NULL ||
            ((SpanBuffer *)b)->owner != me) {
            PyErr_SetString(PyExc_TypeError, "for_thread() must return a SpanBuffer made in the calling thread");
            Py_DECREF(b);
            Py_DECREF(key);
            return NULL;
        }
        int failed = PyDict_SetItem(root->threads, key, b);
        Py_DECREF(b); /* the dict holds it now */
        if (failed) {
            Py_DECREF(key);
            return NULL;
        }
    }
    Py_DECREF(key);
    tls_gen = root->gen;
    tls_buf = (SpanBuffer *)b;
    return (SpanBuffer *)b;
}

static inline SpanBuffer *
thread_buffer(SpanBuffer *root)
{
    if (root->for_thread == NULL)
        return root;
    unsigned long me = PyThread_get_thread_ident();
    if (root->owner == me)
        return root;
    if (tls_gen == root->gen)
        return tls_buf;
    return thread_buffer_slow(root, me);
}

static PyObject *
SpanBuffer_forget(SpanBuffer *self, PyObject *buffer)
{
    if (!Py_IS_TYPE(buffer, &SpanBufferType)) {
        PyErr_SetString(PyExc_TypeError, "forget() takes a SpanBuffer");
        return NULL;
    }
    SpanBuffer *b = (SpanBuffer *)buffer;
    if (tls_gen == self->gen && tls_buf == b)
        tls_gen = 0;
    if (self->threads != NULL) {
        PyObject *key = PyLong_FromUnsignedLong(b->owner);
        if (key == NULL)
            return NULL;
        PyObject *held = PyDict_GetItemWithError(self->threads, key);
        if (held == buffer && PyDict_DelItem(self->threads, key) < 0) {
            Py_DECREF(key);
            return NULL;
        }
        Py_DECREF(key);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef SpanBuffer_methods[] = {
    {"forget", (PyCFunction)SpanBuffer_forget, METH_O,
     "Drop `buffer` (a thread's, that thread ending) from this root; call it in that thread."},
    {NULL},
};

static PyTypeObject SpanBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "marlwatch._fastspan.SpanBuffer",
    .tp_doc = "Preallocated span buffers and the stack of open spans of one thread.",
    .tp_basicsize = sizeof(SpanBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SpanBuffer_init,
    .tp_dealloc = (destructor)SpanBuffer_dealloc,
    .tp_traverse = (traverseproc)SpanBuffer_traverse,
    .tp_clear = (inquiry)SpanBuffer_clear,
    .tp_getset = SpanBuffer_getset,
    .tp_methods = SpanBuffer_methods,
};

/* ------------------------------------------------------------------------------------ Span */

typedef struct {
    PyObject_HEAD
    SpanBuffer *buf;
    int32_t id;
    PyObject *name;
} Span;

static int
Span_init(Span *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "phase_id", "name", NULL};
    PyObject *buf, *name;
    int id;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iU", kwlist, &SpanBufferType, &buf, &id, &name))
        return -1;
    if (((SpanBuffer *)buf)->on_full == NULL) {
        PyErr_SetString(PyExc_ValueError, "the SpanBuffer is not initialised");
        return -1;
    }
    Py_INCREF(buf);
    Py_INCREF(name);
    Py_XSETREF(self->buf, (SpanBuffer *)buf);
    Py_XSETREF(self->name, name);
    self->id = id;
    return 0;
}

static inline int
push(SpanBuffer *b, int32_t id)
{
    if (b->depth == b->stack_capacity) {
        Py_ssize_t cap = b->stack_capacity * 2;
        Frame *grown = PyMem_Realloc(b->stack, sizeof(Frame) * cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->stack = grown;
        b->stack_capacity = cap;
    }
    Frame *f = &b->stack[b->depth++];
    f->id = id;
    f->t0 = now_ns();
    return 0;
}

/* Ends the innermost open span of phase `id` at `t1`. Spans opened inside it and never ended
 * (a hook whose closing half did not run because of an exception) are dropped, unrecorded. */
static inline int
pop(SpanBuffer *b, int32_t id, int64_t t1)
{
    Py_ssize_t d = b->depth;
    while (d > 0 && b->stack[d - 1].id != id)
        d--;
    if (d == 0) {
        PyErr_SetString(PyExc_RuntimeError, "span ended that was never started");
        return -1;
    }
    b->depth = d - 1;
    Frame *f = &b->stack[d - 1];
    Py_ssize_t i = b->n;
    b->ids[i] = f->id;
    b->parents[i] = b->depth ? b->stack[b->depth - 1].id : -1;
    b->t0[i] = f->t0;
    b->t1[i] = t1;
    b->n = ++i;
    if (i >= b->capacity || t1 >= b->ship_at) {
        if (b->on_full == NULL) { /* torn down by the garbage collector: nowhere to ship */
            b->n = 0;
            return 0;
        }
        PyObject *r = PyObject_CallOneArg(b->on_full, (PyObject *)b);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        if (b->n >= b->capacity) /* on_full did not empty the buffers: drop, never overrun */
            b->n = 0;
    }
    return 0;
}

static PyObject *
Span_enter(Span *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buf == NULL) {
        PyErr_SetString(PyExc_ValueError, "Span is not initialised");
        return NULL;
    }
    SpanBuffer *b = thread_buffer(self->buf);
    if (b == NULL || push(b, self->id) < 0)
        return NULL;
    return Py_NewRef(self);
}

static PyObject *
Span_exit(Span *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t t1 = now_ns();
    if (self->buf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "span ended that was never started");
        return NULL;
    }
    SpanBuffer *b = thread_buffer(self->buf);
    if (b == NULL || pop(b, self->id, t1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Drop the calling thread's innermost open span of this phase and any opened inside it,
 * recording nothing: for a hook whose closing half never ran. */
static PyObject *
Span_abandon(Span *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buf == NULL)
        Py_RETURN_NONE;
    SpanBuffer *b = thread_buffer(self->buf);
    if (b == NULL)
        return NULL;
    Py_ssize_t d = b->depth;
    while (d > 0 && b->stack[d - 1].id != self->id)
        d--;
    if (d > 0)
        b->depth = d - 1;
    Py_RETURN_NONE;
}

static int
Span_traverse(Span *self, visitproc visit, void *arg)
{
    Py_VISIT(self->buf);
    return 0;
}

static int
Span_clear(Span *self)
{
    Py_CLEAR(self->buf);
    return 0;
}

static void
Span_dealloc(Span *self)
{
    PyObject_GC_UnTrack(self);
    Span_clear(self);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Span_get_id(Span *self, void *closure)
{
    return PyLong_FromLong(self->id);
}

static PyObject *
Span_get_name(Span *self, void *closure)
{
    return Py_NewRef(self->name ? self->name : Py_None);
}

static PyMethodDef Span_methods[] = {
    {"__enter__", (PyCFunction)Span_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Span_exit, METH_FASTCALL, NULL},
    {"abandon", (PyCFunction)Span_abandon, METH_NOARGS,
     "Drop this thread's innermost open span of this phase (and any inside it), unrecorded."},
    {NULL},
};

static PyObject *
Span_get_innermost(Span *self, void *closure)
{
    if (self->buf == NULL)
        Py_RETURN_FALSE;
    SpanBuffer *b = thread_buffer(self->buf);
    if (b == NULL)
        return NULL;
    return PyBool_FromLong(b->depth > 0 && b->stack[b->depth - 1].id == self->id);
}

static PyGetSetDef Span_getset[] = {
    {"innermost", (getter)Span_get_innermost, NULL,
     "whether this phase is the innermost span open in the calling thread", NULL},
    {"id", (getter)Span_get_id, NULL, "the phase's id in this process", NULL},
    {"name", (getter)Span_get_name, NULL, "the phase's name", NULL},
    {NULL},
};

static PyTypeObject SpanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "marlwatch._fastspan.Span",
    .tp_doc = "A named phase recorded into a SpanBuffer; reusable and nestable.",
    .tp_basicsize = sizeof(Span),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Span_init,
    .tp_dealloc = (destructor)Span_dealloc,
    .tp_traverse = (traverseproc)Span_traverse,
    .tp_clear = (inquiry)Span_clear,
    .tp_methods = Span_methods,
    .tp_getset = Span_getset,
};

/* -------------------------------------------------------------------------------- NullSpan */

/* What a span is when spans are off: the baseline that the overhead is measured against, so it
 * must be as cheap as the real one can be made, not a Python no-op that flatters the ratio. */
typedef struct {
    PyObject_HEAD
} NullSpan;

static PyObject *
NullSpan_enter(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *
NullSpan_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_RETURN_NONE;
}

static PyObject *
NullSpan_abandon(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_RETURN_NONE;
}

static PyObject *
NullSpan_get_innermost(PyObject *self, void *closure)
{
    Py_RETURN_FALSE;
}

static PyGetSetDef NullSpan_getset[] = {
    {"innermost", (getter)NullSpan_get_innermost, NULL, "always False: nothing is ever open", NULL},
    {NULL},
};

static PyMethodDef NullSpan_methods[] = {
    {"__enter__", (PyCFunction)NullSpan_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))NullSpan_exit, METH_FASTCALL, NULL},
    {"abandon", (PyCFunction)NullSpan_abandon, METH_NOARGS, NULL},
    {NULL},
};

static PyTypeObject NullSpanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "marlwatch._fastspan.NullSpan",
    .tp_doc = "A span that records nothing.",
    .tp_basicsize = sizeof(NullSpan),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = NullSpan_methods,
    .tp_getset = NullSpan_getset,
};

/* ---------------------------------------------------------------------------------- module */

static PyObject *
fastspan_now_ns(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(now_ns());
}

static PyMethodDef module_methods[] = {
    {"now_ns", fastspan_now_ns, METH_NOARGS, "The clock spans are stamped with, in ns."},
    {NULL},
};

static struct PyModuleDef fastspan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "marlwatch._fastspan",
    .m_doc = "The span hot path in C (see marlwatch/instrument.py for the API).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastspan(void)
{
    if (PyType_Ready(&SpanBufferType) < 0 || PyType_Ready(&SpanType) < 0 || PyType_Ready(&NullSpanType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastspan_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "SpanBuffer", (PyObject *)&SpanBufferType) < 0 ||
        PyModule_AddObjectRef(m, "Span", (PyObject *)&SpanType) < 0 ||
        PyModule_AddObjectRef(m, "NullSpan", (PyObject *)&NullSpanType) < 0 ||
        PyModule_AddIntConstant(m, "ABI", FASTSPAN_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
