/* Compiled kernels of the dense update rules (downpour/server/kernels.py): SGD with momentum, and the
 * look-ahead momentum of async jobs (server/lookahead.py), each fused with the reply's values, in one pass
 * over a contiguous float32 run, with the GIL released.
 *
 * The torch path does one pass per operation (4 for a look-ahead update, 2 more and a cat for its reply,
 * another copy into a shared-memory slot); here every element is loaded once, updated, and its reply value
 * written straight into the outgoing buffer.
 *
 * Bit for bit torch's results. torch's CPU add with alpha (a.add(b, alpha=s)) is a fused multiply-add,
 * fma(b, s, a), on every path it vectorizes (vec::fmadd) and, compiled for AVX2/AVX-512, on its scalar
 * tails too; its multiply by a scalar and its plain add and subtract are single float32 operations. The
 * kernels repeat torch's operations in its order, each add with alpha as an explicit fmaf(), and the build
 * turns contraction off (-ffp-contract=off) so no other product is fused. Scalars arrive as Python floats
 * (double) and are rounded to float32 once, as torch rounds an alpha. Where the CPU has no FMA instruction
 * torch's vectorized fmadd is not fused, so the kernels refuse to run there (available() is false) and the
 * torch path is taken.
 *
 * Arrays arrive as addresses (tensor.data_ptr()) and lengths: the Python side (kernels.py) checks dtype,
 * contiguity and sizes before calling, so a call costs no buffer-protocol round trip. The gradient may be
 * the very memory the reply goes to (a request's shared-memory slot): each element's gradient is read
 * before its reply value is written, and no pointer is declared restrict.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* x86-64: the loops are compiled for AVX2 + FMA (fmaf is then one instruction, 8 lanes at a time) and run
 * only where the CPU has both. Elsewhere (aarch64: fmaf is always one instruction) the plain build runs. */
#if defined(__x86_64__) && defined(__GNUC__)
#define HOT __attribute__((target("avx2,fma")))
static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define HOT
static int cpu_ok(void) { return 1; }
#endif

enum {
    F_MOMENTUM = 1,  /* a momentum buffer (SGD) */
    F_FIRST = 2,     /* the range's first update: the buffer becomes the gradient (SGD) */
    F_DAMPENING = 4, /* b = b * mu + (1 - dampening) g, instead of b = mu b + g */
    F_NESTEROV = 8,  /* the step is g + mu b, not b */
    F_DECAY = 16,    /* g += weight_decay p first */
    F_OUT = 32,      /* write the reply's values */
    F_OWN = 64,      /* look-ahead reply: add back the worker's own buffer (c b) */
    F_ALL = 128,
};

/* The gradient after weight decay, g.add(p, alpha=wd), and the buffer's update, as torch does them. */
#define GRAD(gi, pi) ((flags & F_DECAY) ? fmaf((pi), wd, (gi)) : (gi))
#define BUFFER(bi, gi) ((flags & F_DAMPENING) ? fmaf((gi), damp1, (bi) * mu) : fmaf((bi), mu, (gi)))
#define STEP(bi, gi) ((flags & F_NESTEROV) ? fmaf((bi), mu, (gi)) : (bi))

/* The loops take their flags as compile-time constants (one copy per combination, see DISPATCH), so each
 * copy is a straight loop that GCC vectorizes. ivdep: the only overlap among the arrays is out == g, read
 * before written at each index, which carries nothing from one iteration to the next. */
#define ALWAYS static inline __attribute__((always_inline))

/* SGD (server/optim.py's SGD.apply) on n values: p, its buffer b (with F_MOMENTUM), gradient g; the new
 * values also into out (with F_OUT). */
ALWAYS void sgd_loop(float *p, float *b, const float *g, float *out, Py_ssize_t n, float lr, float mu, float wd,
                     float damp1, const int flags) {
    float nlr = -lr;
#pragma GCC ivdep
    for (Py_ssize_t i = 0; i < n; i++) {
        float gi = GRAD(g[i], p[i]);
        float d = gi;
        if (flags & F_MOMENTUM) {
            float bi = (flags & F_FIRST) ? gi : BUFFER(b[i], gi);
            b[i] = bi;
            d = STEP(bi, gi);
        }
        float pi = fmaf(d, nlr, p[i]);
        p[i] = pi;
        if (flags & F_OUT)
            out[i] = pi;
    }
}

/* Look-ahead (server/lookahead.py's apply, then values) on n values: p, the pushing worker's buffer b, the
 * buffers' sum total, gradient g; with F_OUT the reply into out: p - c total + c b with F_OWN, else p. */
ALWAYS void lookahead_loop(float *p, float *b, float *total, const float *g, float *out, Py_ssize_t n, float lr,
                           float mu, float wd, float damp1, float c, const int flags) {
    float nlr = -lr, nc = -c;
#pragma GCC ivdep
    for (Py_ssize_t i = 0; i < n; i++) {
        float gi = GRAD(g[i], p[i]);
        float bo = b[i];
        float bi = BUFFER(bo, gi);
        float t = (total[i] - bo) + bi;
        float pi = fmaf(STEP(bi, gi), nlr, p[i]);
        b[i] = bi;
        total[i] = t;
        p[i] = pi;
        if (flags & F_OUT)
            out[i] = (flags & F_OWN) ? fmaf(bi, c, fmaf(t, nc, pi)) : pi;
    }
}

#define C8(X, o) X(o + 0) X(o + 1) X(o + 2) X(o + 3) X(o + 4) X(o + 5) X(o + 6) X(o + 7)
#define C32(X) C8(X, 0) C8(X, 8) C8(X, 16) C8(X, 24)
#define C64(X) C32(X) C8(X, 32) C8(X, 40) C8(X, 48) C8(X, 56)

#define SGD_CASE(f) \
    case f: sgd_loop(p, b, g, out, n, lr, mu, wd, damp1, f); break;
HOT static void sgd_run(float *p, float *b, const float *g, float *out, Py_ssize_t n, float lr, float mu, float wd,
                        float damp1, int flags) {
    switch (flags & (F_OWN - 1)) { C64(SGD_CASE) } /* every flag but OWN */
}

#define LOOKAHEAD_CASE(f) \
    case f: lookahead_loop(p, b, total, g, out, n, lr, mu, wd, damp1, c, (f) << 2); break;
HOT static void lookahead_run(float *p, float *b, float *total, const float *g, float *out, Py_ssize_t n, float lr,
                              float mu, float wd, float damp1, float c, int flags) {
    switch ((flags & (F_ALL - 1)) >> 2) { C32(LOOKAHEAD_CASE) } /* every flag but MOMENTUM and FIRST */
}

static const char sgd_doc[] =
    "sgd(p, b, g, out, n, lr, momentum, weight_decay, 1 - dampening, flags): SGD on n float32 values at the\n"
    "addresses p (parameters), b (momentum buffer, 0: none), g (gradient); the new parameters also into out\n"
    "(0: not). Addresses and sizes are the caller's to check (kernels.py).";

static PyObject *sgd(PyObject *self, PyObject *args) {
    unsigned long long p, b, g, out;
    Py_ssize_t n;
    double lr, mu, wd, damp1;
    int flags;
    if (!PyArg_ParseTuple(args, "KKKKnddddi", &p, &b, &g, &out, &n, &lr, &mu, &wd, &damp1, &flags))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    sgd_run((float *)(uintptr_t)p, (float *)(uintptr_t)b, (const float *)(uintptr_t)g, (float *)(uintptr_t)out, n,
             (float)lr, (float)mu, (float)wd, (float)damp1, flags);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static const char lookahead_doc[] =
    "lookahead(p, b, total, g, out, n, lr, momentum, weight_decay, 1 - dampening, c, flags): one look-ahead\n"
    "update of n float32 values (parameters p, the worker's buffer b, the buffers' sum total, gradient g) and\n"
    "its reply into out (0: none): p - c total + c b with flag OWN, else p.";

static PyObject *lookahead(PyObject *self, PyObject *args) {
    unsigned long long p, b, total, g, out;
    Py_ssize_t n;
    double lr, mu, wd, damp1, c;
    int flags;
    if (!PyArg_ParseTuple(args, "KKKKKndddddi", &p, &b, &total, &g, &out, &n, &lr, &mu, &wd, &damp1, &c, &flags))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    lookahead_run((float *)(uintptr_t)p, (float *)(uintptr_t)b, (float *)(uintptr_t)total, (const float *)(uintptr_t)g,
                   (float *)(uintptr_t)out, n, (float)lr, (float)mu, (float)wd, (float)damp1, (float)c, flags);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* A sync round (server/consistency.py's SyncPolicy): the weighted mean of k workers' gradients, as torch
 * computes it (acc = g0 * w0, acc.add_(gj, alpha=wj) for each next one, acc.div_(wsum)), then SGD on it
 * (sgd_loop), the new values written into each of the outs (the workers' reply slots). Block by block, so
 * that every array is read or written once from memory and the mean never leaves the cache: one pass in all
 * where the torch path takes four for the mean, one for the step and one per reply. A reply slot may be its
 * worker's gradient: a block's gradients are all read before its outs are written. */
#define ROUND_BLOCK 1024

HOT static void mean_block(float *m, const float *const *g, const float *w, Py_ssize_t k, float wsum, Py_ssize_t at,
                           Py_ssize_t len) {
    const float *g0 = g[0] + at;
    float w0 = w[0];
    for (Py_ssize_t i = 0; i < len; i++)
        m[i] = g0[i] * w0;
    for (Py_ssize_t j = 1; j < k; j++) {
        const float *gj = g[j] + at;
        float wj = w[j];
        for (Py_ssize_t i = 0; i < len; i++)
            m[i] = fmaf(gj[i], wj, m[i]);
    }
    for (Py_ssize_t i = 0; i < len; i++)
        m[i] = m[i] / wsum;
}

HOT static void sgd_mean_run(float *p, float *b, const float *const *g, const float *w, Py_ssize_t k, float wsum,
                             float *const *outs, Py_ssize_t nouts, Py_ssize_t n, float lr, float mu, float wd,
                             float damp1, int flags) {
    float m[ROUND_BLOCK];
    flags = nouts ? (flags | F_OUT) : (flags & ~F_OUT);
    for (Py_ssize_t at = 0; at < n; at += ROUND_BLOCK) {
        Py_ssize_t len = n - at < ROUND_BLOCK ? n - at : ROUND_BLOCK;
        mean_block(m, g, w, k, wsum, at, len);
        sgd_run(p + at, b ? b + at : NULL, m, nouts ? outs[0] + at : NULL, len, lr, mu, wd, damp1, flags);
        for (Py_ssize_t j = 1; j < nouts; j++)
            memcpy(outs[j] + at, outs[0] + at, (size_t)len * sizeof(float));
    }
}

/* A tuple of addresses (ints) as pointers, in `into` (k of them). */
static int addresses(PyObject *tuple, void **into, Py_ssize_t k) {
    for (Py_ssize_t j = 0; j < k; j++) {
        unsigned long long a = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tuple, j));
        if (a == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        into[j] = (void *)(uintptr_t)a;
    }
    return 0;
}

static const char sgd_mean_doc[] =
    "sgd_mean(p, b, grads, weights, wsum, outs, n, lr, momentum, weight_decay, 1 - dampening, flags): a sync\n"
    "round on n float32 values: the weighted mean of the gradients at the addresses in the tuple grads (weights:\n"
    "a tuple of floats as long, wsum their sum), then SGD on p (b: momentum buffer, 0: none), the new values\n"
    "written into each address of the tuple outs (may be empty). Addresses and sizes are the caller's to check.";

static PyObject *sgd_mean(PyObject *self, PyObject *args) {
    unsigned long long p, b;
    PyObject *grads, *weights, *outs;
    Py_ssize_t n;
    double wsum, lr, mu, wd, damp1;
    int flags;
    if (!PyArg_ParseTuple(args, "KKO!O!dO!nddddi", &p, &b, &PyTuple_Type, &grads, &PyTuple_Type, &weights, &wsum,
                          &PyTuple_Type, &outs, &n, &lr, &mu, &wd, &damp1, &flags))
        return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(grads), nouts = PyTuple_GET_SIZE(outs);
    if (k < 1 || PyTuple_GET_SIZE(weights) != k) {
        PyErr_SetString(PyExc_ValueError, "sgd_mean: one weight per gradient, and at least one gradient");
        return NULL;
    }
    void **ptrs = PyMem_Malloc((size_t)(k + nouts) * sizeof(void *));
    float *w = PyMem_Malloc((size_t)k * sizeof(float));
    if (ptrs == NULL || w == NULL) {
        PyMem_Free(ptrs);
        PyMem_Free(w);
        return PyErr_NoMemory();
    }
    int bad = addresses(grads, ptrs, k) < 0 || addresses(outs, ptrs + k, nouts) < 0;
    for (Py_ssize_t j = 0; !bad && j < k; j++) {
        double wj = PyFloat_AsDouble(PyTuple_GET_ITEM(weights, j));
        bad = wj == -1.0 && PyErr_Occurred();
        w[j] = (float)wj;
    }
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        sgd_mean_run((float *)(uintptr_t)p, (float *)(uintptr_t)b, (const float *const *)ptrs, w, k, (float)wsum,
                     (float *const *)(ptrs + k), nouts, n, (float)lr, (float)mu, (float)wd, (float)damp1, flags);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(ptrs);
    PyMem_Free(w);
    if (bad)
        return NULL;
    Py_RETURN_NONE;
}

/* Whether every one of n float32 values is within [-limit, limit]: NaN fails (every comparison with it is
 * false), and so does an infinity. One read-only pass, branch-free (vectorized), no early exit: a request
 * is refused rarely, and the pass over a shard's gradient costs less than the branch per element. */
HOT static int within_run(const float *g, Py_ssize_t n, float limit) {
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        bad |= !(fabsf(g[i]) <= limit);
    return !bad;
}

static const char within_doc[] =
    "within(g, n, limit): whether the n float32 values at address g are all finite and at most limit in\n"
    "magnitude (limit is rounded to float32: pass one that is exact there). The caller checks the address.";

static PyObject *within(PyObject *self, PyObject *args) {
    unsigned long long g;
    Py_ssize_t n;
    double limit;
    int ok;
    if (!PyArg_ParseTuple(args, "Knd", &g, &n, &limit))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    ok = within_run((const float *)(uintptr_t)g, n, (float)limit);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

static PyObject *available(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_ok()); }

static PyMethodDef methods[] = {
    {"sgd", sgd, METH_VARARGS, sgd_doc},
    {"lookahead", lookahead, METH_VARARGS, lookahead_doc},
    {"within", within, METH_VARARGS, within_doc},
    {"sgd_mean", sgd_mean, METH_VARARGS, sgd_mean_doc},
    {"available", available, METH_NOARGS, "Whether this CPU runs the kernels (x86-64: AVX2 and FMA)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "downpour.server._dense",
    "Compiled dense update rules (SGD momentum, look-ahead momentum, fused with the reply's values) and the\n"
    "gradient's bound check.", -1, methods,
};

PyMODINIT_FUNC PyInit__dense(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MOMENTUM", F_MOMENTUM) < 0 || PyModule_AddIntConstant(m, "FIRST", F_FIRST) < 0 ||
        PyModule_AddIntConstant(m, "DAMPENING", F_DAMPENING) < 0 ||
        PyModule_AddIntConstant(m, "NESTEROV", F_NESTEROV) < 0 || PyModule_AddIntConstant(m, "DECAY", F_DECAY) < 0 ||
        PyModule_AddIntConstant(m, "OUT", F_OUT) < 0 || PyModule_AddIntConstant(m, "OWN", F_OWN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
