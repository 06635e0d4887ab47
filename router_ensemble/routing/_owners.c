/* OwnerTable: the KV index's block hash -> worker bitmask map, as a flat C hash table.
 *
 * Why: `KvIndex.find_matches` walks a prompt's block hashes through this map, one lookup per
 * block. In a Python dict a lookup is three dependent memory loads (index slot, entry, key
 * object), and between requests the index falls out of the CPU caches; here a lookup is one
 * 16-byte slot (open addressing, linear probing, load factor <= 1/2) and the walk runs in
 * one C loop, so the lookups of consecutive blocks overlap in memory.
 *
 * The subset of dict's API the index uses: get, [key] = value, pop, len, plus `walk`. Keys
 * and values must fit in 64 bits (a mask of at most 64 workers); a value of 0 never stored
 * (an empty slot holds 0). Otherwise OverflowError, and the index switches to a dict.
 *
 * Built by `pip install -e .` (setup.py, optional: without a compiler the index uses a dict).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef uint64_t u64;

typedef struct {
    u64 key;
    u64 value; /* 0: empty */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t mask; /* capacity - 1, capacity a power of two */
    int shift;   /* 64 - log2(capacity) */
    Py_ssize_t len;
} OwnerTable;

/* Fibonacci hashing: block hashes are random already, but tests and other engines may use
 * small or sequential ints. */
static inline size_t home(const OwnerTable *t, u64 key) {
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> t->shift);
}

static int alloc_slots(OwnerTable *t, int bits) {
    Slot *slots = PyMem_Calloc((size_t)1 << bits, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->slots = slots;
    t->mask = ((size_t)1 << bits) - 1;
    t->shift = 64 - bits;
    return 0;
}

static Slot *find(const OwnerTable *t, u64 key) {
    size_t i = home(t, key);
    for (;;) {
        Slot *s = &t->slots[i];
        if (s->value == 0) return NULL;
        if (s->key == key) return s;
        i = (i + 1) & t->mask;
    }
}

static void put_new(OwnerTable *t, u64 key, u64 value) {
    size_t i = home(t, key);
    while (t->slots[i].value != 0) i = (i + 1) & t->mask;
    t->slots[i].key = key;
    t->slots[i].value = value;
}

static int grow(OwnerTable *t) {
    Slot *old = t->slots;
    size_t old_cap = t->mask + 1;
    int bits = 64 - t->shift + 1;
    if (alloc_slots(t, bits) < 0) return -1;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].value != 0) put_new(t, old[i].key, old[i].value);
    PyMem_Free(old);
    return 0;
}

/* Backward-shift deletion: no tombstones, so lookups never slow down with churn. */
static void erase(OwnerTable *t, Slot *s) {
    size_t i = (size_t)(s - t->slots), j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        Slot *next = &t->slots[j];
        if (next->value == 0) break;
        size_t h = home(t, next->key);
        /* move next into the hole at i unless its home lies cyclically in (i, j] */
        if (((j - h) & t->mask) >= ((j - i) & t->mask)) {
            t->slots[i] = *next;
            i = j;
        }
    }
    t->slots[i].value = 0;
    t->slots[i].key = 0;
    t->len--;
}

static int as_u64(PyObject *obj, u64 *out) {
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "OwnerTable keys and values are ints");
        return -1;
    }
    /* OverflowError: negative or >= 2**64. PyLong_AsUnsignedLong is a plain digit loop, several
     * times faster than PyLong_AsUnsignedLongLong (a byte-array conversion in CPython 3.11). */
#if ULONG_MAX >= 0xFFFFFFFFFFFFFFFFULL
    *out = PyLong_AsUnsignedLong(obj);
#else
    *out = PyLong_AsUnsignedLongLong(obj);
#endif
    return (*out == (u64)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* A key that cannot be stored is certainly absent. */
static int lookup_key(PyObject *obj, u64 *out) {
    if (as_u64(obj, out) == 0) return 1;
    if (PyErr_ExceptionMatches(PyExc_OverflowError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

/* ------------------------------------------------------------------ Python type */

static PyObject *table_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    OwnerTable *t;
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "OwnerTable() takes no arguments");
        return NULL;
    }
    t = (OwnerTable *)type->tp_alloc(type, 0);
    if (t == NULL) return NULL;
    if (alloc_slots(t, 10) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static void table_dealloc(OwnerTable *t) {
    PyMem_Free(t->slots);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t table_len(OwnerTable *t) { return t->len; }

static PyObject *table_subscript(OwnerTable *t, PyObject *key) {
    u64 k;
    int ok = lookup_key(key, &k);
    Slot *s;
    if (ok < 0) return NULL;
    s = ok ? find(t, k) : NULL;
    if (s == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(s->value);
}

static int table_ass_subscript(OwnerTable *t, PyObject *key, PyObject *value) {
    u64 k, v;
    Slot *s;
    if (value == NULL) { /* del table[key] */
        int ok = lookup_key(key, &k);
        if (ok < 0) return -1;
        s = ok ? find(t, k) : NULL;
        if (s == NULL) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        erase(t, s);
        return 0;
    }
    if (as_u64(key, &k) < 0 || as_u64(value, &v) < 0) return -1;
    if (v == 0) {
        PyErr_SetString(PyExc_ValueError, "OwnerTable does not store 0 (pop the key instead)");
        return -1;
    }
    s = find(t, k);
    if (s != NULL) {
        s->value = v;
        return 0;
    }
    if ((size_t)(t->len + 1) * 2 > t->mask + 1 && grow(t) < 0) return -1;
    put_new(t, k, v);
    t->len++;
    return 0;
}

static PyObject *table_get(OwnerTable *t, PyObject *const *args, Py_ssize_t nargs) {
    u64 k;
    int ok;
    Slot *s;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    ok = lookup_key(args[0], &k);
    if (ok < 0) return NULL;
    s = ok ? find(t, k) : NULL;
    if (s != NULL) return PyLong_FromUnsignedLongLong(s->value);
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

static PyObject *table_pop(OwnerTable *t, PyObject *const *args, Py_ssize_t nargs) {
    u64 k, v;
    int ok;
    Slot *s;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    ok = lookup_key(args[0], &k);
    if (ok < 0) return NULL;
    s = ok ? find(t, k) : NULL;
    if (s == NULL) {
        if (nargs == 2) return Py_NewRef(args[1]);
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    v = s->value;
    erase(t, s);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *table_items(OwnerTable *t, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->slots[i].value == 0) continue;
        PyObject *item = Py_BuildValue("(KK)", (unsigned long long)t->slots[i].key,
                                       (unsigned long long)t->slots[i].value);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

PyDoc_STRVAR(walk_doc,
"walk(block_hashes, mask) -> list[tuple[int, int]]\n\n"
"Walk the hashes from the first, AND-ing each one's value (0 when absent) into `mask`\n"
"until it is 0. Returns (depth, bits) for every set of bits that dropped out after\n"
"`depth` > 0 blocks, and (len(block_hashes), bits) for those that held every block.");

static int add_change(PyObject *out, Py_ssize_t depth, u64 bits) {
    PyObject *item = Py_BuildValue("(nK)", depth, (unsigned long long)bits);
    int rc = item == NULL ? -1 : PyList_Append(out, item);
    Py_XDECREF(item);
    return rc;
}

static PyObject *table_walk(OwnerTable *t, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *seq, *out;
    Py_ssize_t n, depth;
    u64 mask;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "walk(block_hashes, mask)");
        return NULL;
    }
    mask = PyLong_AsUnsignedLongLongMask(args[1]); /* -1 (every worker) -> all ones */
    if (mask == (u64)-1 && PyErr_Occurred()) return NULL;
    seq = PySequence_Fast(args[0], "block_hashes must be a sequence");
    if (seq == NULL) return NULL;
    out = PyList_New(0);
    if (out == NULL) goto fail;
    n = PySequence_Fast_GET_SIZE(seq);
    {
        /* The table is larger than the caches, and a lookup is one cache miss: each slot is
         * prefetched PREFETCH blocks ahead. */
        enum { PREFETCH = 16, STACK_KEYS = 512 };
        u64 stack_keys[STACK_KEYS], *keys = stack_keys;
        unsigned char stack_valid[STACK_KEYS], *valid = stack_valid;
        PyObject **items = PySequence_Fast_ITEMS(seq);
        if (n > STACK_KEYS) {
            keys = PyMem_Malloc((size_t)n * sizeof(u64));
            valid = PyMem_Malloc((size_t)n);
            if (keys == NULL || valid == NULL) {
                if (keys != stack_keys) PyMem_Free(keys);
                if (valid != stack_valid) PyMem_Free(valid);
                PyErr_NoMemory();
                goto fail;
            }
        }
        /* keys[i] is converted and its slot prefetched PREFETCH blocks before the walk
         * reaches it, so a walk that stops early converts few keys it does not need */
        Py_ssize_t ready = 0;
        for (depth = 0; depth < n; depth++) {
            u64 held = 0;
            for (; ready < n && ready <= depth + PREFETCH; ready++) {
                int ok = lookup_key(items[ready], &keys[ready]);
                if (ok < 0) break;
                valid[ready] = (unsigned char)ok;
                if (ok) __builtin_prefetch(&t->slots[home(t, keys[ready])]);
            }
            if (PyErr_Occurred()) break;
            if (valid[depth]) {
                const Slot *slot = find(t, keys[depth]);
                if (slot != NULL) held = slot->value & mask;
            }
            if (held != mask) {
                if (depth && add_change(out, depth, mask & ~held) < 0) break;
                mask = held;
                if (!mask) break;
            }
        }
        if (keys != stack_keys) PyMem_Free(keys);
        if (valid != stack_valid) PyMem_Free(valid);
        if (PyErr_Occurred()) goto fail;
    }
    if (n && mask && add_change(out, n, mask) < 0) goto fail;
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))table_get, METH_FASTCALL, "get(key, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))table_pop, METH_FASTCALL, "pop(key[, default])"},
    {"items", (PyCFunction)table_items, METH_NOARGS, "[(key, value), ...] in no order"},
    {"walk", (PyCFunction)(void (*)(void))table_walk, METH_FASTCALL, walk_doc},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods table_as_mapping = {
    (lenfunc)table_len,
    (binaryfunc)table_subscript,
    (objobjargproc)table_ass_subscript,
};

static PyTypeObject OwnerTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router_ensemble.routing._owners.OwnerTable",
    .tp_basicsize = sizeof(OwnerTable),
    .tp_dealloc = (destructor)table_dealloc,
    .tp_as_mapping = &table_as_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Block hash -> worker bitmask (64-bit both), open addressing.",
    .tp_methods = table_methods,
    .tp_new = table_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_owners", "The KV index's owner table (see routing/index.py).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__owners(void) {
    PyObject *m;
    if (PyType_Ready(&OwnerTableType) < 0) return NULL;
    m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&OwnerTableType);
    if (PyModule_AddObject(m, "OwnerTable", (PyObject *)&OwnerTableType) < 0) {
        Py_DECREF(&OwnerTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
