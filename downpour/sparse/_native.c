/* Compiled kernels of the sparse table (downpour/sparse/table.py): index probe, insert, and pull/push
 * fused with the probe, one call per batch with the GIL released.
 *
 * The index layout is the Python `Index`'s: a power-of-two array of int64 keys (INT64_MIN marks a free
 * slot) beside an int32 array of values (row numbers), splitmix64's finaliser as the hash, linear probing.
 * Every array arrives through the buffer protocol (numpy arrays, C-contiguous), so the build needs only
 * Python.h; each is checked for item type, size and writability before any memory is touched.
 *
 * Speed comes from memory-level parallelism: a table of 10M rows is far larger than the caches, so each
 * key costs a few cache misses (index slot, row values, optimizer state, last-push step). Every kernel
 * therefore runs in two loops over the batch: the first resolves keys to rows while prefetching the index
 * slots of the key AHEAD places on; the second updates (or copies) rows while prefetching the rows of the
 * key AHEAD places on. The misses of ~AHEAD keys are then in flight together instead of one at a time.
 * The prefetches fetch into L2, not L1 (see prefetch_line).
 *
 * The arithmetic repeats numpy's (rules.py) operation by operation in float32, and the build turns off
 * FMA contraction (-ffp-contract=off), so SGD, Adagrad and FTRL give bit-identical results on either path;
 * Adam's bias corrections use libm's pow in double as numpy does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define EMPTY INT64_MIN
#define AHEAD 16 /* keys between a prefetch and its use: enough misses in flight to hide the latency */
#define LINE 64  /* cache line, bytes */
/* For the prefetch helpers: GCC judges a function whose only effect is prefetching to have none and
 * drops the calls to it, unless it is inlined first. */
#define PREFETCH_HELPER static inline __attribute__((always_inline)) void

static inline uint64_t mix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z;
}

/* Prefetch the cache line of p into L2 (locality 2: PREFETCHT1 on x86-64) rather than into L1 (PREFETCHT0,
 * GCC's default). A kernel keeps AHEAD keys' worth of misses in flight, several lines per key. The likely
 * reason the L2 hint is faster: a miss headed for L1 holds one of the core's few L1 fill buffers (10 to 16
 * on recent x86 cores) until its line arrives, while L2 tracks several times as many, so more of the
 * misses overlap; moving the line from L2 to L1 when it is used costs some 15 cycles against a memory
 * access's hundreds. Measured side by side on a 10M-row table: push +3 to +18 %, pull +6 to +19 %, the
 * index probe alone +20 % (benchmarks/RESULTS.md section 8). CPUs that treat every hint alike see the
 * same prefetch as before.
 *
 * Always as a read: GCC emits nothing for a write prefetch on x86-64 without -mprfchw, and a line read
 * ahead is in the cache to be written too. */
PREFETCH_HELPER prefetch_line(const void *p) { __builtin_prefetch(p, 0, 2); }

/* Prefetch the cache lines of [p, p + bytes). */
PREFETCH_HELPER prefetch_span(const void *p, size_t bytes) {
    const char *c = (const char *)((uintptr_t)p & ~(uintptr_t)(LINE - 1));
    const char *end = (const char *)p + bytes;
    for (; c < end; c += LINE)
        prefetch_line(c);
}

/* ---- buffers -------------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    Py_ssize_t n; /* items */
    int held;
} Arr;

/* Take a C-contiguous buffer of `obj` whose items are `kind` ('i' signed integer, 'f' float) of `size`
 * bytes. Raises TypeError for anything else (wrong type, dtype, layout, read-only where writing). */
static int take(PyObject *obj, Arr *a, char kind, Py_ssize_t size, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &a->view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: need a %sC-contiguous array, got %s", name, writable ? "writable " : "",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    a->held = 1;
    const char *f = a->view.format ? a->view.format : "B";
    if (*f == '@' || *f == '=' || *f == '<') /* native or little-endian: every machine this builds on */
        f++;
    int ok = a->view.itemsize == size && f[0] != '\0' && f[1] == '\0' &&
             (kind == 'f' ? f[0] == 'f' : strchr("bhilq", f[0]) != NULL);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: need %s items of %zd bytes, got format '%s' of %zd bytes", name,
                     kind == 'f' ? "float" : "signed integer", size, a->view.format ? a->view.format : "B",
                     a->view.itemsize);
        return -1;
    }
    a->n = a->view.len / size;
    return 0;
}

static void release(Arr *arrs, int count) {
    for (int i = 0; i < count; i++)
        if (arrs[i].held)
            PyBuffer_Release(&arrs[i].view);
}

static int need_items(const Arr *a, Py_ssize_t n, const char *name) {
    if (a->n != n) {
        PyErr_Format(PyExc_ValueError, "%s: need %zd items, got %zd", name, n, a->n);
        return -1;
    }
    return 0;
}

/* ---- the index ------------------------------------------------------------------------------------ */

typedef struct {
    const int64_t *keys;
    int32_t *vals;
    uint64_t mask;
} Index;

/* Index arrays: keys int64 and vals int32 of the same power-of-two length. */
static int take_index(PyObject *keys, PyObject *vals, Arr *ak, Arr *av, int writable, Index *ix) {
    if (take(keys, ak, 'i', 8, writable, "index keys") < 0 || take(vals, av, 'i', 4, writable, "index values") < 0)
        return -1;
    if (ak->n < 1 || (ak->n & (ak->n - 1)) != 0 || av->n != ak->n) {
        PyErr_Format(PyExc_ValueError, "index: need key and value arrays of one power-of-two length, got %zd and %zd",
                     ak->n, av->n);
        return -1;
    }
    ix->keys = (const int64_t *)ak->view.buf;
    ix->vals = (int32_t *)av->view.buf;
    ix->mask = (uint64_t)ak->n - 1;
    return 0;
}

PREFETCH_HELPER prefetch_slot(const Index *ix, int64_t key) {
    uint64_t s = mix((uint64_t)key) & ix->mask;
    prefetch_line(&ix->keys[s]);
    prefetch_line(&ix->vals[s]);
}

/* The value stored for `key`, or -1. The reserved key EMPTY is never present; the probe is bounded by the
 * capacity so that even a full (corrupt) index cannot loop forever. */
static inline int32_t probe(const Index *ix, int64_t key) {
    if (key == EMPTY)
        return -1;
    uint64_t s = mix((uint64_t)key) & ix->mask;
    for (uint64_t i = 0; i <= ix->mask; i++) {
        int64_t at = ix->keys[s];
        if (at == key)
            return ix->vals[s];
        if (at == EMPTY)
            return -1;
        s = (s + 1) & ix->mask;
    }
    return -1;
}

/* Rows of `n` keys into `rows` (-1 where absent). Returns how many are absent, or -1 if the index names
 * a row outside [0, nrows) (nrows < 0: no bound, for indexes of counts). Runs without the GIL. */
static Py_ssize_t resolve(const Index *ix, const int64_t *keys, Py_ssize_t n, int32_t *rows, Py_ssize_t nrows) {
    Py_ssize_t absent = 0;
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + AHEAD < n)
            prefetch_slot(ix, keys[i + AHEAD]);
        int32_t r = probe(ix, keys[i]);
        rows[i] = r;
        absent += r < 0;
        bad |= r < -1 || (nrows >= 0 && r >= nrows);
    }
    return bad ? -1 : absent;
}

static PyObject *bad_row_error(void) {
    PyErr_SetString(PyExc_ValueError, "index: a value lies outside the row pool (corrupt index or wrong arrays)");
    return NULL;
}

PyDoc_STRVAR(lookup_doc, "lookup(index_keys, index_vals, keys, out) -> int\n\n"
                         "Write each key's value (int32) into out, -1 where absent; return how many are absent.");

static PyObject *lookup(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Arr a[4] = {0};
    PyObject *result = NULL;
    Index ix;
    if (!PyArg_ParseTuple(args, "OOOO:lookup", &o[0], &o[1], &o[2], &o[3]))
        return NULL;
    if (take_index(o[0], o[1], &a[0], &a[1], 0, &ix) < 0 || take(o[2], &a[2], 'i', 8, 0, "keys") < 0 ||
        take(o[3], &a[3], 'i', 4, 1, "out") < 0 || need_items(&a[3], a[2].n, "out") < 0)
        goto done;
    Py_ssize_t absent;
    Py_BEGIN_ALLOW_THREADS
    absent = resolve(&ix, a[2].view.buf, a[2].n, a[3].view.buf, -1);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(absent);
done:
    release(a, 4);
    return result;
}

PyDoc_STRVAR(insert_doc, "insert(index_keys, index_vals, keys, vals) -> int\n\n"
                         "Insert or overwrite key -> value (int32); return how many keys were new. The caller keeps\n"
                         "the load at most 1/2; an index with no free slot left raises ValueError part-way.");

static PyObject *insert(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Arr a[4] = {0};
    PyObject *result = NULL;
    Index ix;
    if (!PyArg_ParseTuple(args, "OOOO:insert", &o[0], &o[1], &o[2], &o[3]))
        return NULL;
    if (take_index(o[0], o[1], &a[0], &a[1], 1, &ix) < 0 || take(o[2], &a[2], 'i', 8, 0, "keys") < 0 ||
        take(o[3], &a[3], 'i', 4, 0, "vals") < 0 || need_items(&a[3], a[2].n, "vals") < 0)
        goto done;
    const int64_t *keys = a[2].view.buf;
    const int32_t *vals = a[3].view.buf;
    Py_ssize_t n = a[2].n;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (keys[i] == EMPTY) {
            PyErr_Format(PyExc_ValueError, "keys: %lld is reserved (it marks a free slot)", (long long)EMPTY);
            goto done;
        }
    }
    int64_t *slots = (int64_t *)ix.keys;
    Py_ssize_t added = 0;
    int full = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !full; i++) {
        if (i + AHEAD < n)
            prefetch_slot(&ix, keys[i + AHEAD]);
        uint64_t s = mix((uint64_t)keys[i]) & ix.mask;
        uint64_t j = 0;
        while (j <= ix.mask && slots[s] != keys[i] && slots[s] != EMPTY) { /* probe to the key or a free slot */
            s = (s + 1) & ix.mask;
            j++;
        }
        if (j > ix.mask) {
            full = 1;
        } else {
            added += slots[s] == EMPTY;
            slots[s] = keys[i];
            ix.vals[s] = vals[i];
        }
    }
    Py_END_ALLOW_THREADS
    if (full)
        PyErr_SetString(PyExc_ValueError, "index: no free slot left");
    else
        result = PyLong_FromSsize_t(added);
done:
    release(a, 4);
    return result;
}

/* ---- pull ----------------------------------------------------------------------------------------- */

PyDoc_STRVAR(gather_doc, "gather(index_keys, index_vals, keys, values, dim, out, rows) -> int\n\n"
                         "Copy each key's row of values (float32, rows of dim) into out (n, dim), zeros where the\n"
                         "key has no row; write the row numbers (int32, -1 where absent) into rows. Returns how\n"
                         "many keys have no row. Changes nothing else.");

static PyObject *gather(PyObject *self, PyObject *args) {
    PyObject *o[6];
    Arr a[6] = {0};
    Py_ssize_t dim;
    PyObject *result = NULL;
    Index ix;
    if (!PyArg_ParseTuple(args, "OOOOnOO:gather", &o[0], &o[1], &o[2], &o[3], &dim, &o[4], &o[5]))
        return NULL;
    if (dim < 1) {
        PyErr_Format(PyExc_ValueError, "dim must be positive, got %zd", dim);
        return NULL;
    }
    if (take_index(o[0], o[1], &a[0], &a[1], 0, &ix) < 0 || take(o[2], &a[2], 'i', 8, 0, "keys") < 0 ||
        take(o[3], &a[3], 'f', 4, 0, "values") < 0 || take(o[4], &a[4], 'f', 4, 1, "out") < 0 ||
        take(o[5], &a[5], 'i', 4, 1, "rows") < 0)
        goto done;
    Py_ssize_t n = a[2].n;
    if (a[3].n % dim != 0) {
        PyErr_Format(PyExc_ValueError, "values: %zd items are not whole rows of %zd", a[3].n, dim);
        goto done;
    }
    if (need_items(&a[4], n * dim, "out") < 0 || need_items(&a[5], n, "rows") < 0)
        goto done;
    const float *values = a[3].view.buf;
    float *out = a[4].view.buf;
    int32_t *rows = a[5].view.buf;
    size_t row_bytes = (size_t)dim * sizeof(float);
    Py_ssize_t absent;
    Py_BEGIN_ALLOW_THREADS
    absent = resolve(&ix, a[2].view.buf, n, rows, a[3].n / dim);
    for (Py_ssize_t i = 0; i < n && absent >= 0; i++) {
        if (i + AHEAD < n && rows[i + AHEAD] >= 0)
            prefetch_span(values + (size_t)rows[i + AHEAD] * dim, row_bytes);
        if (rows[i] >= 0)
            memcpy(out + i * dim, values + (size_t)rows[i] * dim, row_bytes);
        else
            memset(out + i * dim, 0, row_bytes);
    }
    Py_END_ALLOW_THREADS
    result = absent < 0 ? bad_row_error() : PyLong_FromSsize_t(absent);
done:
    release(a, 6);
    return result;
}

/* ---- push ----------------------------------------------------------------------------------------- */

/* What every push kernel takes first: the index, the batch, the row pool and its last-push steps. */
typedef struct {
    Arr a[6]; /* index keys, index vals, keys, grads, values, touched */
    Index ix;
    const int64_t *keys;
    const float *grads;
    float *values;
    int32_t *touched;
    int32_t *rows; /* scratch: the batch's row numbers */
    Py_ssize_t n, dim, nrows;
    int32_t step;
} Push;

#define PUSH_FORMAT "OOOOnOOi" /* index_keys, index_vals, keys, grads, dim, values, touched, step */

static int push_open(Push *p, PyObject **o) {
    if (p->dim < 1) {
        PyErr_Format(PyExc_ValueError, "dim must be positive, got %zd", p->dim);
        return -1;
    }
    Arr *a = p->a;
    if (take_index(o[0], o[1], &a[0], &a[1], 0, &p->ix) < 0 || take(o[2], &a[2], 'i', 8, 0, "keys") < 0 ||
        take(o[3], &a[3], 'f', 4, 0, "grads") < 0 || take(o[4], &a[4], 'f', 4, 1, "values") < 0 ||
        take(o[5], &a[5], 'i', 4, 1, "touched") < 0)
        return -1;
    p->n = a[2].n;
    p->nrows = a[5].n;
    if (need_items(&a[3], p->n * p->dim, "grads") < 0 || need_items(&a[4], p->nrows * p->dim, "values") < 0)
        return -1;
    p->keys = a[2].view.buf;
    p->grads = a[3].view.buf;
    p->values = a[4].view.buf;
    p->touched = a[5].view.buf;
    p->rows = PyMem_Malloc(p->n > 0 ? p->n * sizeof(int32_t) : 1);
    if (!p->rows) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void push_close(Push *p, Arr *state, int nstate) {
    release(p->a, 6);
    release(state, nstate);
    PyMem_Free(p->rows);
}

/* A per-row state array of the push's pool: `per_row` items of `kind` for each of its rows. */
static int take_state(Push *p, PyObject *obj, Arr *a, char kind, Py_ssize_t per_row, const char *name) {
    if (take(obj, a, kind, 4, 1, name) < 0)
        return -1;
    return need_items(a, p->nrows * per_row, name);
}

/* The loop every rule shares: resolve the batch, then for each key with a row run the body (the last
 * argument, commas allowed) with `w` (the row's values), `g` (its gradient), `r` (its row number) and `D`
 * (the row length), after marking the row pushed at `step`. Rows named AHEAD keys on are prefetched
 * (values, the listed float state arrays, touched). Sets `bad` when the index names a row outside the
 * pool; nothing is written then.
 *
 * The loop is compiled once per common row length (D a constant: the row update becomes a few straight
 * vector instructions) and once for any other (D = dim). Together with `restrict` on the row pointers
 * (a row of values, of each state array and of the gradients never overlap: they lie in distinct
 * arrays) the per-row code loses its alias checks: about 7 % faster with rows in the cache, within the
 * noise on a table far larger than the caches (benchmarks/RESULTS.md section 8). Vector and scalar
 * float32 operations round alike (IEEE), so the results stay bit-identical to numpy's. */
#define PUSH_ROWS(P, LEN, STATE, NSTATE, ...)                                                              \
    do {                                                                                                   \
        const Py_ssize_t D = (LEN), n_ = (P)->n;                                                           \
        const int32_t *rows_ = (P)->rows, step_ = (P)->step;                                               \
        float *values_ = (P)->values;                                                                      \
        const float *grads_ = (P)->grads;                                                                  \
        int32_t *touched_ = (P)->touched;                                                                  \
        float *const *state_ = (STATE);                                                                    \
        for (Py_ssize_t i = 0; i < n_; i++) {                                                              \
            if (i + AHEAD < n_ && rows_[i + AHEAD] >= 0) {                                                 \
                size_t ra = (size_t)rows_[i + AHEAD];                                                      \
                prefetch_span(values_ + ra * D, D * sizeof(float));                                        \
                for (int k = 0; k < (NSTATE); k++)                                                         \
                    prefetch_span(state_[k] + ra * D, D * sizeof(float));                                  \
                prefetch_line(&touched_[ra]);                                                              \
            }                                                                                              \
            int32_t r = rows_[i];                                                                          \
            if (r < 0)                                                                                     \
                continue;                                                                                  \
            float *restrict w = values_ + (size_t)r * D;                                                   \
            const float *restrict g = grads_ + i * D;                                                      \
            touched_[r] = step_;                                                                           \
            __VA_ARGS__                                                                                    \
        }                                                                                                  \
    } while (0)

#define PUSH_LOOP(P, STATE, NSTATE, ...)                                                                   \
    do {                                                                                                   \
        bad = resolve(&(P)->ix, (P)->keys, (P)->n, (P)->rows, (P)->nrows) < 0;                             \
        if (bad)                                                                                           \
            break;                                                                                         \
        switch ((P)->dim) {                                                                                \
        case 8: PUSH_ROWS(P, 8, STATE, NSTATE, __VA_ARGS__); break;                                        \
        case 16: PUSH_ROWS(P, 16, STATE, NSTATE, __VA_ARGS__); break;                                      \
        case 32: PUSH_ROWS(P, 32, STATE, NSTATE, __VA_ARGS__); break;                                      \
        case 64: PUSH_ROWS(P, 64, STATE, NSTATE, __VA_ARGS__); break;                                      \
        default: PUSH_ROWS(P, (P)->dim, STATE, NSTATE, __VA_ARGS__); break;                                \
        }                                                                                                  \
    } while (0)

PyDoc_STRVAR(push_sgd_doc, "push_sgd(index_keys, index_vals, keys, grads, dim, values, touched, step, lr)\n\n"
                           "w -= lr * g on each key's row; keys without a row are skipped; touched[row] = step.");

static PyObject *push_sgd(PyObject *self, PyObject *args) {
    PyObject *o[6];
    Push p = {0};
    float lr;
    int bad = 0;
    if (!PyArg_ParseTuple(args, PUSH_FORMAT "f:push_sgd", &o[0], &o[1], &o[2], &o[3], &p.dim, &o[4], &o[5], &p.step,
                          &lr))
        return NULL;
    if (push_open(&p, o) < 0) {
        push_close(&p, NULL, 0);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    PUSH_LOOP(&p, NULL, 0, {
        for (Py_ssize_t j = 0; j < D; j++)
            w[j] -= lr * g[j];
    });
    Py_END_ALLOW_THREADS
    push_close(&p, NULL, 0);
    return bad ? bad_row_error() : Py_NewRef(Py_None);
}

PyDoc_STRVAR(push_adagrad_doc,
             "push_adagrad(index_keys, index_vals, keys, grads, dim, values, touched, step, sums, lr, eps)\n\n"
             "sums += g * g; w -= lr * g / (sqrt(sums) + eps) on each key's row (torch.optim.Adagrad).");

static PyObject *push_adagrad(PyObject *self, PyObject *args) {
    PyObject *o[7];
    Push p = {0};
    Arr st[1] = {0};
    float lr, eps;
    int bad = 0;
    if (!PyArg_ParseTuple(args, PUSH_FORMAT "Off:push_adagrad", &o[0], &o[1], &o[2], &o[3], &p.dim, &o[4], &o[5],
                          &p.step, &o[6], &lr, &eps))
        return NULL;
    if (push_open(&p, o) < 0 || take_state(&p, o[6], &st[0], 'f', p.dim, "sums") < 0) {
        push_close(&p, st, 1);
        return NULL;
    }
    float *sums = st[0].view.buf;
    float *state[1] = {sums};
    Py_BEGIN_ALLOW_THREADS
    PUSH_LOOP(&p, state, 1, {
        float *restrict s = sums + (size_t)r * D;
        for (Py_ssize_t j = 0; j < D; j++) {
            float acc = s[j] + g[j] * g[j];
            s[j] = acc;
            w[j] -= lr * g[j] / (sqrtf(acc) + eps);
        }
    });
    Py_END_ALLOW_THREADS
    push_close(&p, st, 1);
    return bad ? bad_row_error() : Py_NewRef(Py_None);
}

PyDoc_STRVAR(push_adam_doc,
             "push_adam(index_keys, index_vals, keys, grads, dim, values, touched, step, m, v, t, lr, b1, b2, eps)\n\n"
             "Lazy Adam on each key's row: its step count t (int32 per row) and moments advance (torch.optim.Adam).");

static PyObject *push_adam(PyObject *self, PyObject *args) {
    PyObject *o[9];
    Push p = {0};
    Arr st[3] = {0};
    float lr, eps;
    double b1, b2;
    int bad = 0;
    if (!PyArg_ParseTuple(args, PUSH_FORMAT "OOOfddf:push_adam", &o[0], &o[1], &o[2], &o[3], &p.dim, &o[4], &o[5],
                          &p.step, &o[6], &o[7], &o[8], &lr, &b1, &b2, &eps))
        return NULL;
    if (push_open(&p, o) < 0 || take_state(&p, o[6], &st[0], 'f', p.dim, "m") < 0 ||
        take_state(&p, o[7], &st[1], 'f', p.dim, "v") < 0 || take_state(&p, o[8], &st[2], 'i', 1, "t") < 0) {
        push_close(&p, st, 3);
        return NULL;
    }
    float *m = st[0].view.buf, *v = st[1].view.buf;
    int32_t *t = st[2].view.buf;
    float *state[2] = {m, v};
    /* numpy's constants: float32 of the betas and of their complements, computed in double */
    const float c1 = (float)b1, c1m = (float)(1 - b1), c2 = (float)b2, c2m = (float)(1 - b2);
    Py_BEGIN_ALLOW_THREADS
    PUSH_LOOP(&p, state, 2, {
        int32_t tr = t[r] + 1;
        t[r] = tr;
        float bc1 = (float)(1 - pow(b1, (double)tr)), bc2 = (float)(1 - pow(b2, (double)tr));
        float step_size = lr / bc1, root_bc2 = sqrtf(bc2);
        float *restrict mr = m + (size_t)r * D, *restrict vr = v + (size_t)r * D;
        for (Py_ssize_t j = 0; j < D; j++) {
            float mj = mr[j] * c1 + g[j] * c1m;
            float vj = vr[j] * c2 + g[j] * g[j] * c2m;
            mr[j] = mj;
            vr[j] = vj;
            w[j] -= step_size * mj / (sqrtf(vj) / root_bc2 + eps);
        }
    });
    Py_END_ALLOW_THREADS
    push_close(&p, st, 3);
    return bad ? bad_row_error() : Py_NewRef(Py_None);
}

PyDoc_STRVAR(push_ftrl_doc,
             "push_ftrl(index_keys, index_vals, keys, grads, dim, values, touched, step, z, n, alpha, beta, l1, l2)\n\n"
             "FTRL-Proximal per coordinate of each key's row (McMahan et al. 2013).");

static PyObject *push_ftrl(PyObject *self, PyObject *args) {
    PyObject *o[8];
    Push p = {0};
    Arr st[2] = {0};
    float alpha, beta, l1, l2;
    int bad = 0;
    if (!PyArg_ParseTuple(args, PUSH_FORMAT "OOffff:push_ftrl", &o[0], &o[1], &o[2], &o[3], &p.dim, &o[4], &o[5],
                          &p.step, &o[6], &o[7], &alpha, &beta, &l1, &l2))
        return NULL;
    if (push_open(&p, o) < 0 || take_state(&p, o[6], &st[0], 'f', p.dim, "z") < 0 ||
        take_state(&p, o[7], &st[1], 'f', p.dim, "n") < 0) {
        push_close(&p, st, 2);
        return NULL;
    }
    float *z = st[0].view.buf, *nsum = st[1].view.buf;
    float *state[2] = {z, nsum};
    Py_BEGIN_ALLOW_THREADS
    PUSH_LOOP(&p, state, 2, {
        float *restrict zr = z + (size_t)r * D, *restrict nr = nsum + (size_t)r * D;
        for (Py_ssize_t j = 0; j < D; j++) {
            float n_new = nr[j] + g[j] * g[j];
            float sigma = (sqrtf(n_new) - sqrtf(nr[j])) / alpha;
            float zj = zr[j] + (g[j] - sigma * w[j]);
            zr[j] = zj;
            nr[j] = n_new;
            float sign = zj > 0 ? 1.0f : zj < 0 ? -1.0f : 0.0f;
            w[j] = fabsf(zj) <= l1 ? 0.0f : (sign * l1 - zj) / ((beta + sqrtf(n_new)) / alpha + l2);
        }
    });
    Py_END_ALLOW_THREADS
    push_close(&p, st, 2);
    return bad ? bad_row_error() : Py_NewRef(Py_None);
}

/* ---- request checks and row initialisation ------------------------------------------------------- */

PyDoc_STRVAR(check_ids_doc, "check_ids(keys, num_servers, rank, salt, unique) -> int\n\n"
                            "Check a request's IDs in one pass: 0 when all is well; 1 when an ID belongs to another server\n"
                            "(splitmix64(key ^ salt) >> 33, modulo num_servers, is not rank; num_servers 1: never); 2 when\n"
                            "unique is true and an ID repeats. The numpy check it replaces: layout.sparse_servers and\n"
                            "np.unique.");

static PyObject *check_ids(PyObject *self, PyObject *args) {
    PyObject *o;
    Py_ssize_t num_servers, rank;
    unsigned long long salt;
    int unique;
    Arr a[1] = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OnnKp:check_ids", &o, &num_servers, &rank, &salt, &unique))
        return NULL;
    if (num_servers < 1 || rank < 0 || rank >= num_servers) {
        PyErr_Format(PyExc_ValueError, "check_ids: rank %zd of %zd servers", rank, num_servers);
        return NULL;
    }
    if (take(o, &a[0], 'i', 8, 0, "keys") < 0)
        goto done;
    const int64_t *keys = a[0].view.buf;
    Py_ssize_t n = a[0].n;
    int code = 0;
    int64_t *set = NULL;
    uint64_t mask = 0;
    if (unique && n > 1) {
        uint64_t cap = 16;
        while (cap < (uint64_t)n * 2)
            cap <<= 1;
        set = PyMem_RawMalloc(cap * sizeof(int64_t));
        if (set == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        mask = cap - 1;
    }
    Py_BEGIN_ALLOW_THREADS
    if (num_servers > 1) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((Py_ssize_t)((mix((uint64_t)keys[i] ^ (uint64_t)salt) >> 33) % (uint64_t)num_servers) != rank) {
                code = 1;
                break;
            }
        }
    }
    if (code == 0 && set != NULL) {
        /* An open-addressing set of the keys seen; EMPTY marks a free slot, so EMPTY itself is tracked aside. */
        for (uint64_t j = 0; j <= mask; j++)
            set[j] = EMPTY;
        int empty_seen = 0;
        for (Py_ssize_t i = 0; i < n && code == 0; i++) {
            int64_t k = keys[i];
            if (k == EMPTY) {
                code = empty_seen ? 2 : 0;
                empty_seen = 1;
                continue;
            }
            uint64_t s = mix((uint64_t)k) & mask;
            while (set[s] != EMPTY && set[s] != k)
                s = (s + 1) & mask;
            if (set[s] == k)
                code = 2;
            else
                set[s] = k;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(set);
    result = PyLong_FromLong(code);
done:
    release(a, 1);
    return result;
}

PyDoc_STRVAR(init_rows_doc, "init_rows(keys, rows, seed, scale, values, dim) -> None\n\n"
                            "Write the seeded initial row of each key into values[rows[i]] (values: a pool of rows of dim\n"
                            "float32): SparseTable.initial's numbers, bit for bit: h = mix(mix(key ^ seed) + column),\n"
                            "((h >> 40) / 2**24 * 2 - 1) * scale in float32.");

static PyObject *init_rows(PyObject *self, PyObject *args) {
    PyObject *o[3];
    unsigned long long seed;
    double scale;
    Py_ssize_t dim;
    Arr a[3] = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOKdOn:init_rows", &o[0], &o[1], &seed, &scale, &o[2], &dim))
        return NULL;
    if (dim < 1) {
        PyErr_Format(PyExc_ValueError, "dim must be positive, got %zd", dim);
        return NULL;
    }
    if (take(o[0], &a[0], 'i', 8, 0, "keys") < 0 || take(o[1], &a[1], 'i', 8, 0, "rows") < 0 ||
        need_items(&a[1], a[0].n, "rows") < 0 || take(o[2], &a[2], 'f', 4, 1, "values") < 0)
        goto done;
    if (a[2].n % dim != 0) {
        PyErr_Format(PyExc_ValueError, "values: %zd items are not whole rows of %zd", a[2].n, dim);
        goto done;
    }
    const int64_t *keys = a[0].view.buf;
    const int64_t *rows = a[1].view.buf;
    float *values = a[2].view.buf;
    Py_ssize_t n = a[0].n, nrows = a[2].n / dim;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= nrows) {
            PyErr_Format(PyExc_ValueError, "rows: %lld lies outside the pool of %zd rows", (long long)rows[i], nrows);
            goto done;
        }
    }
    float s = (float)scale;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t base = mix((uint64_t)keys[i] ^ (uint64_t)seed);
        float *row = values + (size_t)rows[i] * dim;
        for (Py_ssize_t c = 0; c < dim; c++) {
            uint64_t h = mix(base + (uint64_t)c);
            row[c] = ((float)(h >> 40) / 16777216.0f * 2.0f - 1.0f) * s;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(a, 3);
    return result;
}

static PyMethodDef methods[] = {
    {"lookup", lookup, METH_VARARGS, lookup_doc},
    {"insert", insert, METH_VARARGS, insert_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {"push_sgd", push_sgd, METH_VARARGS, push_sgd_doc},
    {"push_adagrad", push_adagrad, METH_VARARGS, push_adagrad_doc},
    {"push_adam", push_adam, METH_VARARGS, push_adam_doc},
    {"push_ftrl", push_ftrl, METH_VARARGS, push_ftrl_doc},
    {"check_ids", check_ids, METH_VARARGS, check_ids_doc},
    {"init_rows", init_rows, METH_VARARGS, init_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "downpour.sparse._native",
    "Compiled kernels of the sparse table: index probe/insert and pull/push fused with the probe.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
