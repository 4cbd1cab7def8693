/* A spill block of plain records, in one pass over the entries, for core/_spill.
 *
 *     encode([(stream, value, time), ...]) -> bytes, or None when some entry is not plain
 *     decode(bytes) -> [(stream, value, time), ...]      (ValueError when the bytes are not a block)
 *
 *     block:  0x01, the count of entries (4 bytes), then per entry: stream (1 byte, 0..6), kind (1 byte), time (8 bytes, a double),
 *             then the value: nothing (None, False, True), 8 bytes (an int64, a double), or a
 *             4-byte length and that many bytes (a str's UTF-8, a bytes)
 *
 * Plain: a stream number 0..6 (an int or a Stream member), a time that is a float, a value that is
 * None, a bool, an int that fits 64 bits, a float, a str or a bytes, each of exactly that type (a
 * subclass, a container, a str with a lone surrogate or anything else: None, and the caller
 * pickles the block). Numbers are in this machine's byte order: a block is read back by the
 * process that wrote it.
 *
 * Why: a thread job streaming 100,000 ints spilled ~82,000 of them, and the pass spent ~55 ns an
 * entry taking the tuples apart into columns and pickling them (thread_time, load 0.4-2.5); this
 * takes ~11. The first byte tells a block from a pickle (protocol 2 and later start with 0x80).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define TAG 0x01
enum { K_NONE, K_FALSE, K_TRUE, K_INT, K_FLOAT, K_STR, K_BYTES };
#define STREAMS 7

/* The bytes an entry's value takes after its 10-byte head, or -1 when the entry is not plain (no
 * error set). A str's UTF-8 is made here (CPython keeps it in the str: none for an ASCII one). */
static Py_ssize_t
value_size(PyObject *entry, const char **data, int *kind, long *stream, double *t)
{
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3)
        return -1;
    PyObject *s = PyTuple_GET_ITEM(entry, 0), *v = PyTuple_GET_ITEM(entry, 1), *tm = PyTuple_GET_ITEM(entry, 2);
    if (!PyLong_Check(s) || !PyFloat_CheckExact(tm))
        return -1;
    int overflow = 0;
    *stream = PyLong_AsLongAndOverflow(s, &overflow);
    if (overflow || *stream < 0 || *stream >= STREAMS)
        return -1;
    *t = PyFloat_AS_DOUBLE(tm);
    if (v == Py_None) { *kind = K_NONE; return 0; }
    if (v == Py_False) { *kind = K_FALSE; return 0; }
    if (v == Py_True) { *kind = K_TRUE; return 0; }
    if (PyLong_CheckExact(v)) {
        (void)PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow)
            return -1;
        *kind = K_INT;
        return 8;
    }
    if (PyFloat_CheckExact(v)) { *kind = K_FLOAT; return 8; }
    Py_ssize_t n;
    if (PyUnicode_CheckExact(v)) {
        *data = PyUnicode_AsUTF8AndSize(v, &n);
        if (*data == NULL) {  /* a lone surrogate: pickle keeps it */
            PyErr_Clear();
            return -1;
        }
        *kind = K_STR;
    } else if (PyBytes_CheckExact(v)) {
        *data = PyBytes_AS_STRING(v);
        n = PyBytes_GET_SIZE(v);
        *kind = K_BYTES;
    } else {
        return -1;
    }
    if ((uint64_t)n > UINT32_MAX)
        return -1;
    return 4 + n;
}

static PyObject *
encode(PyObject *module, PyObject *block)
{
    if (!PyList_CheckExact(block)) {
        PyErr_SetString(PyExc_TypeError, "encode: a list of entries");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(block), total = 5;
    if ((uint64_t)count > UINT32_MAX)
        Py_RETURN_NONE;
    const char *data = NULL;
    int kind = K_NONE;
    long stream = 0;
    double t = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t n = value_size(PyList_GET_ITEM(block, i), &data, &kind, &stream, &t);
        if (n < 0)
            Py_RETURN_NONE;
        total += 10 + n;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    *p++ = TAG;
    uint32_t n32 = (uint32_t)count;
    memcpy(p, &n32, 4);
    p += 4;
    /* The second pass sees the same entries: no Python code runs in between (the GIL is held and
     * nothing here calls back into Python), and the list is ours (a slice made by the caller). */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyList_GET_ITEM(block, i);
        Py_ssize_t n = value_size(entry, &data, &kind, &stream, &t);
        p[0] = (char)stream;
        p[1] = (char)kind;
        memcpy(p + 2, &t, 8);
        p += 10;
        if (kind == K_INT) {
            long long x = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1));
            memcpy(p, &x, 8);
        } else if (kind == K_FLOAT) {
            double x = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(entry, 1));
            memcpy(p, &x, 8);
        } else if (kind == K_STR || kind == K_BYTES) {
            uint32_t len = (uint32_t)(n - 4);
            memcpy(p, &len, 4);
            memcpy(p + 4, data, len);
        }
        p += n;
    }
    return out;
}

static PyObject *
bad(Py_ssize_t at)
{
    PyErr_Format(PyExc_ValueError, "decode: not a spill block (at byte %zd)", at);
    return NULL;
}

static PyObject *
decode(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *start = view.buf, *p = start, *end = start + view.len;
    PyObject *out = NULL;
    uint32_t count;
    if (view.len < 5 || (unsigned char)*p != TAG) {
        bad(0);
        goto done;
    }
    memcpy(&count, p + 1, 4);
    p += 5;
    if ((uint64_t)(end - p) / 10 < count) {  /* each entry takes at least 10 bytes */
        bad(1);
        goto done;
    }
    out = PyList_New(count);  /* its empty slots are NULL: freed as they are on an error below */
    if (out == NULL)
        goto done;
    for (uint32_t i = 0; i < count; i++) {
        if (end - p < 10 || (unsigned char)p[0] >= STREAMS || (unsigned char)p[1] > K_BYTES)
            goto corrupt;
        long stream = (unsigned char)p[0];
        int kind = (unsigned char)p[1];
        double t;
        memcpy(&t, p + 2, 8);
        p += 10;
        PyObject *v;
        if (kind == K_NONE || kind == K_FALSE || kind == K_TRUE) {
            v = kind == K_NONE ? Py_None : kind == K_TRUE ? Py_True : Py_False;
            Py_INCREF(v);
        } else if (kind == K_INT || kind == K_FLOAT) {
            if (end - p < 8)
                goto corrupt;
            if (kind == K_INT) {
                long long x;
                memcpy(&x, p, 8);
                v = PyLong_FromLongLong(x);
            } else {
                double x;
                memcpy(&x, p, 8);
                v = PyFloat_FromDouble(x);
            }
            p += 8;
        } else {
            uint32_t len;
            if (end - p < 4)
                goto corrupt;
            memcpy(&len, p, 4);
            p += 4;
            if ((uint64_t)(end - p) < len)
                goto corrupt;
            v = kind == K_STR ? PyUnicode_DecodeUTF8(p, len, "strict") : PyBytes_FromStringAndSize(p, len);
            p += len;
        }
        PyObject *entry = PyTuple_New(3), *s = PyLong_FromLong(stream), *tm = PyFloat_FromDouble(t);
        if (v == NULL || entry == NULL || s == NULL || tm == NULL) {
            Py_XDECREF(v);
            Py_XDECREF(entry);
            Py_XDECREF(s);
            Py_XDECREF(tm);
            Py_CLEAR(out);
            goto done;
        }
        PyTuple_SET_ITEM(entry, 0, s);
        PyTuple_SET_ITEM(entry, 1, v);
        PyTuple_SET_ITEM(entry, 2, tm);
        PyList_SET_ITEM(out, i, entry);
    }
    if (p != end)
        goto corrupt;
done:
    PyBuffer_Release(&view);
    return out;
corrupt:
    Py_CLEAR(out);
    bad(p - start);
    goto done;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_O, "A spill block of plain entries, or None (see the module's comment)."},
    {"decode", decode, METH_O, "The entries of a block made by encode."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cspill", NULL, 0, methods};

PyMODINIT_FUNC
PyInit__cspill(void)
{
    return PyModule_Create(&module);
}
