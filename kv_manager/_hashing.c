/* Chained block hashes in C: the fast path of kv_manager.hashing.hash_blocks.
 *
 * Same values as the pure-Python path (Dynamo's scheme): a block's local hash is XXH3-64
 * (seed 1337) over its token ids as little-endian u32; the chained hash of block 0 is its
 * local hash, of block i XXH3-64 (seed 1337) over the little-endian u64 pair
 * (h[i-1], local[i]). The Python path calls the xxhash package twice per block; here the
 * token conversion, both hashes and the chain stay in one C loop.
 *
 * XXH3-64 (seeded, scalar) is written out below from the reference implementation,
 * xxHash by Yann Collet (BSD 2-Clause, https://github.com/Cyan4973/xxHash): its secret
 * and constants, and the code paths for every input length. The tests compare `xxh3_64`
 * with the xxhash package for every length up to several KiB and several seeds, and
 * kv_manager/hashing.py checks one prompt against the Python path at import (a mismatch
 * there means the Python path is used).
 *
 * Built by `pip install -e .` (setup.py, optional: without a compiler the package still
 * installs and hashing.py uses the Python path).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;

#define P32_1 0x9E3779B1U
#define P32_2 0x85EBCA77U
#define P32_3 0xC2B2AE3DU
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P64_4 0x85EBCA77C2B2AE63ULL
#define P64_5 0x27D4EB2F165667C5ULL
#define PMX_1 0x165667919E3779F9ULL
#define PMX_2 0x9FB21C651E98DF25ULL

#define SECRET_SIZE 192
#define SECRET_SIZE_MIN 136
#define STRIPE_LEN 64
#define SECRET_CONSUME_RATE 8

static const u8 kSecret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* Little-endian loads and stores, whatever the host's byte order. */
static inline u32 read32(const u8 *p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
static inline u64 read64(const u8 *p) { return (u64)read32(p) | ((u64)read32(p + 4) << 32); }
static inline void write32(u8 *p, u32 v) {
    p[0] = (u8)v; p[1] = (u8)(v >> 8); p[2] = (u8)(v >> 16); p[3] = (u8)(v >> 24);
}
static inline void write64(u8 *p, u64 v) { write32(p, (u32)v); write32(p + 4, (u32)(v >> 32)); }

static inline u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }
static inline u64 swap64(u64 x) {
    return ((x << 56) & 0xff00000000000000ULL) | ((x << 40) & 0x00ff000000000000ULL) |
           ((x << 24) & 0x0000ff0000000000ULL) | ((x << 8) & 0x000000ff00000000ULL) |
           ((x >> 8) & 0x00000000ff000000ULL) | ((x >> 24) & 0x0000000000ff0000ULL) |
           ((x >> 40) & 0x000000000000ff00ULL) | ((x >> 56) & 0x00000000000000ffULL);
}
static inline u32 swap32(u32 x) {
    return ((x << 24) & 0xff000000U) | ((x << 8) & 0x00ff0000U) | ((x >> 8) & 0x0000ff00U) |
           ((x >> 24) & 0x000000ffU);
}

static inline u64 mul128_fold64(u64 lhs, u64 rhs) {
#if defined(__SIZEOF_INT128__)
    __uint128_t product = (__uint128_t)lhs * rhs;
    return (u64)product ^ (u64)(product >> 64);
#else
    u64 lo_lo = (lhs & 0xFFFFFFFFULL) * (rhs & 0xFFFFFFFFULL);
    u64 hi_lo = (lhs >> 32) * (rhs & 0xFFFFFFFFULL);
    u64 lo_hi = (lhs & 0xFFFFFFFFULL) * (rhs >> 32);
    u64 hi_hi = (lhs >> 32) * (rhs >> 32);
    u64 cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
    u64 upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
    u64 lower = (cross << 32) | (lo_lo & 0xFFFFFFFFULL);
    return lower ^ upper;
#endif
}

static inline u64 avalanche(u64 h) {
    h ^= h >> 37;
    h *= PMX_1;
    return h ^ (h >> 32);
}

static inline u64 xxh64_avalanche(u64 h) {
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    return h ^ (h >> 32);
}

static inline u64 rrmxmx(u64 h, u64 len) {
    h ^= rotl64(h, 49) ^ rotl64(h, 24);
    h *= PMX_2;
    h ^= (h >> 35) + len;
    h *= PMX_2;
    return h ^ (h >> 28);
}

static u64 len_0to16(const u8 *in, size_t len, const u8 *secret, u64 seed) {
    if (len > 8) {
        u64 bitflip1 = (read64(secret + 24) ^ read64(secret + 32)) + seed;
        u64 bitflip2 = (read64(secret + 40) ^ read64(secret + 48)) - seed;
        u64 lo = read64(in) ^ bitflip1;
        u64 hi = read64(in + len - 8) ^ bitflip2;
        return avalanche(len + swap64(lo) + hi + mul128_fold64(lo, hi));
    }
    if (len >= 4) {
        u64 s = seed ^ ((u64)swap32((u32)seed) << 32);
        u32 in1 = read32(in), in2 = read32(in + len - 4);
        u64 bitflip = (read64(secret + 8) ^ read64(secret + 16)) - s;
        u64 input64 = in2 + ((u64)in1 << 32);
        return rrmxmx(input64 ^ bitflip, len);
    }
    if (len) {
        u8 c1 = in[0], c2 = in[len >> 1], c3 = in[len - 1];
        u32 combined = ((u32)c1 << 16) | ((u32)c2 << 24) | ((u32)c3 << 0) | ((u32)len << 8);
        u64 bitflip = (read32(secret) ^ read32(secret + 4)) + seed;
        return xxh64_avalanche((u64)combined ^ bitflip);
    }
    return xxh64_avalanche(seed ^ (read64(secret + 56) ^ read64(secret + 64)));
}

static inline u64 mix16(const u8 *in, const u8 *secret, u64 seed) {
    return mul128_fold64(read64(in) ^ (read64(secret) + seed),
                         read64(in + 8) ^ (read64(secret + 8) - seed));
}

static u64 len_17to128(const u8 *in, size_t len, const u8 *secret, u64 seed) {
    u64 acc = len * P64_1;
    if (len > 32) {
        if (len > 64) {
            if (len > 96) {
                acc += mix16(in + 48, secret + 96, seed);
                acc += mix16(in + len - 64, secret + 112, seed);
            }
            acc += mix16(in + 32, secret + 64, seed);
            acc += mix16(in + len - 48, secret + 80, seed);
        }
        acc += mix16(in + 16, secret + 32, seed);
        acc += mix16(in + len - 32, secret + 48, seed);
    }
    acc += mix16(in, secret, seed);
    acc += mix16(in + len - 16, secret + 16, seed);
    return avalanche(acc);
}

static u64 len_129to240(const u8 *in, size_t len, const u8 *secret, u64 seed) {
    u64 acc = len * P64_1, acc_end;
    unsigned rounds = (unsigned)len / 16, i;
    for (i = 0; i < 8; i++) acc += mix16(in + 16 * i, secret + 16 * i, seed);
    acc_end = mix16(in + len - 16, secret + SECRET_SIZE_MIN - 17, seed);
    acc = avalanche(acc);
    for (i = 8; i < rounds; i++) acc_end += mix16(in + 16 * i, secret + 16 * (i - 8) + 3, seed);
    return avalanche(acc + acc_end);
}

static void accumulate_512(u64 *acc, const u8 *in, const u8 *secret) {
    for (size_t lane = 0; lane < 8; lane++) {
        u64 data_val = read64(in + lane * 8);
        u64 data_key = data_val ^ read64(secret + lane * 8);
        acc[lane ^ 1] += data_val;
        acc[lane] += (u64)(u32)data_key * (u64)(u32)(data_key >> 32);
    }
}

static void scramble(u64 *acc, const u8 *secret) {
    for (size_t lane = 0; lane < 8; lane++) {
        u64 a = acc[lane];
        a ^= a >> 47;
        a ^= read64(secret + lane * 8);
        a *= P32_1;
        acc[lane] = a;
    }
}

static u64 hash_long(const u8 *in, size_t len, u64 seed) {
    u8 secret[SECRET_SIZE];
    u64 acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
    const size_t stripes_per_block = (SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME_RATE;
    const size_t block_len = STRIPE_LEN * stripes_per_block;
    const size_t blocks = (len - 1) / block_len;
    size_t n, s, stripes;
    u64 result;

    for (int i = 0; i < SECRET_SIZE / 16; i++) {
        write64(secret + 16 * i, read64(kSecret + 16 * i) + seed);
        write64(secret + 16 * i + 8, read64(kSecret + 16 * i + 8) - seed);
    }
    for (n = 0; n < blocks; n++) {
        for (s = 0; s < stripes_per_block; s++)
            accumulate_512(acc, in + n * block_len + s * STRIPE_LEN, secret + s * SECRET_CONSUME_RATE);
        scramble(acc, secret + SECRET_SIZE - STRIPE_LEN);
    }
    stripes = ((len - 1) - block_len * blocks) / STRIPE_LEN;
    for (s = 0; s < stripes; s++)
        accumulate_512(acc, in + blocks * block_len + s * STRIPE_LEN, secret + s * SECRET_CONSUME_RATE);
    accumulate_512(acc, in + len - STRIPE_LEN, secret + SECRET_SIZE - STRIPE_LEN - 7);

    result = len * P64_1;
    for (int i = 0; i < 4; i++)
        result += mul128_fold64(acc[2 * i] ^ read64(secret + 11 + 16 * i),
                                acc[2 * i + 1] ^ read64(secret + 11 + 16 * i + 8));
    return avalanche(result);
}

/* XXH3_64bits_withSeed */
static u64 xxh3_64(const u8 *in, size_t len, u64 seed) {
    if (len <= 16) return len_0to16(in, len, kSecret, seed);
    if (len <= 128) return len_17to128(in, len, kSecret, seed);
    if (len <= 240) return len_129to240(in, len, kSecret, seed);
    return hash_long(in, len, seed);
}

/* ------------------------------------------------------------------ Python API */

/* One token id as u32: an int (or int subclass) in [0, 2**32), else TypeError or
 * OverflowError. No Python code runs here (no __index__), so the borrowed items of the
 * token list cannot change under the loop; hashing.py retries other objects in Python. */
static int token_u32(PyObject *item, u32 *out) {
    unsigned long value;
    if (!PyLong_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "token ids must be ints");
        return -1;
    }
    value = PyLong_AsUnsignedLong(item);
    if (value == (unsigned long)-1 && PyErr_Occurred()) return -1;
    if (value > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "unsigned int is greater than maximum");
        return -1;
    }
    *out = (u32)value;
    return 0;
}

PyDoc_STRVAR(chained_hashes_doc,
"chained_hashes(token_ids, block_size, parent, start, end) -> list[int]\n\n"
"Chained hashes of the full blocks of token_ids[start:end] (both block-aligned, checked by\n"
"the caller), the first chained onto `parent` (an int, or None for the root).");

static PyObject *chained_hashes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *seq, *result = NULL;
    Py_ssize_t block_size, start, end, nblocks, b, t;
    u64 parent = 0;
    int has_parent;
    u8 pair[16], *buf = NULL;
    (void)self;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "chained_hashes expects 5 arguments");
        return NULL;
    }
    block_size = PyLong_AsSsize_t(args[1]);
    start = PyLong_AsSsize_t(args[3]);
    end = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) return NULL;
    has_parent = args[2] != Py_None;
    if (has_parent) {
        parent = PyLong_AsUnsignedLongLong(args[2]);
        if (parent == (u64)-1 && PyErr_Occurred()) return NULL;
    }
    seq = PySequence_Fast(args[0], "token_ids must be a sequence");
    if (seq == NULL) return NULL;
    if (block_size <= 0 || start < 0 || end < start || end > PySequence_Fast_GET_SIZE(seq) ||
        (end - start) % block_size) {
        PyErr_SetString(PyExc_ValueError, "chained_hashes: bad block_size, start or end");
        goto done;
    }
    nblocks = (end - start) / block_size;
    buf = PyMem_Malloc((size_t)block_size * 4);
    result = PyList_New(nblocks);
    if (buf == NULL || result == NULL) {
        if (buf == NULL) PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    {
        PyObject **items = PySequence_Fast_ITEMS(seq) + start;
        for (b = 0; b < nblocks; b++, items += block_size) {
            u64 local, chained;
            PyObject *value;
            for (t = 0; t < block_size; t++) {
                u32 token;
                if (token_u32(items[t], &token) < 0) {
                    Py_CLEAR(result);
                    goto done;
                }
                write32(buf + 4 * t, token);
            }
            local = xxh3_64(buf, (size_t)block_size * 4, 1337);
            if (has_parent) {
                write64(pair, parent);
                write64(pair + 8, local);
                chained = xxh3_64(pair, 16, 1337);
            } else {
                chained = local;
                has_parent = 1;
            }
            parent = chained;
            value = PyLong_FromUnsignedLongLong(chained);
            if (value == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(result, b, value);
        }
    }
done:
    PyMem_Free(buf);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(xxh3_64_doc,
"xxh3_64(data, seed) -> int\n\nXXH3-64 of a bytes-like object with a 64-bit seed (for tests).");

static PyObject *py_xxh3_64(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer view;
    u64 seed, h;
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "xxh3_64 expects 2 arguments");
        return NULL;
    }
    seed = PyLong_AsUnsignedLongLongMask(args[1]);
    if (seed == (u64)-1 && PyErr_Occurred()) return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    h = xxh3_64((const u8 *)view.buf, (size_t)view.len, seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"chained_hashes", (PyCFunction)(void (*)(void))chained_hashes, METH_FASTCALL, chained_hashes_doc},
    {"xxh3_64", (PyCFunction)(void (*)(void))py_xxh3_64, METH_FASTCALL, xxh3_64_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hashing", "Chained XXH3-64 block hashes (see kv_manager.hashing).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hashing(void) { return PyModule_Create(&module); }
