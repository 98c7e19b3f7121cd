/*
 * collnet.codec._minmax: C kernels for the blockwise min-max quantizer.
 *
 * An optional accelerator for collnet/codec/minmax.py, which documents the
 * format and stays the reference: every byte this module writes and every
 * float32 it produces is identical to the numpy path (tests/unit/
 * test_codec_fast.py checks that). That holds because only IEEE-exact
 * float32 operations are used, each rounded on its own:
 *
 *   - min/max are exact whatever the reduction order; the sign of a zero
 *     minimum/maximum is canonicalised (v + 0.0f turns -0 into +0), as in
 *     the numpy path, because it would otherwise depend on that order;
 *   - (x - lo) / d, scale * L + lo and code * scale + lo are separate
 *     float32 operations: build with -ffp-contract=off (no FMA) and without
 *     -ffast-math (no reciprocal division, no reassociation);
 *   - rint with ties to even is the 2**23 trick: for 0 <= q <= 255 the sum
 *     q + 2**23 rounds q to an integer in round-to-nearest-even mode and
 *     holds it in its low mantissa bits.
 *
 * No numpy C API: arguments are buffers. Errors the Python side reports
 * precisely (non-finite input, corrupt header or padding) come back as a
 * return code, and the caller reruns the numpy path to raise the typed
 * error. Misaligned float buffers and overlapping input/output buffers also
 * come back as a return code (the numpy path handles them). The loops run
 * without the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define MM_SSE2 1
#endif

/* 0: float in float; 16 (with AVX512-FP16): likewise, _Float16 in _Float16. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != 16
#error "float32 arithmetic must not use excess precision (x87); build with SSE2"
#endif
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "the encoded layout is little-endian; this accelerator assumes a little-endian host"
#endif
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "build without -ffast-math: results must be bit-identical to numpy"
#endif

#define RC_OK 0
#define RC_INVALID 1  /* non-finite input / corrupt encoding: numpy path raises */
#define RC_FALLBACK 2 /* buffers the kernels do not take (misaligned, overlapping) */

/* Codes per uint4 staging chunk (even, so chunks start on byte boundaries). */
#define CHUNK 4096

static const float MAGIC = 8388608.0f; /* 2**23 */

/* -- encode ----------------------------------------------------------------- */

/* lo/hi of x[0..m) (m >= 1) ignoring NaN; *bad set when any NaN was seen. */
static void
block_minmax(const float *x, size_t m, float *plo, float *phi, int *pbad)
{
    float lo = x[0], hi = x[0];
    int bad = 0;
    size_t i = 0;
#ifdef MM_SSE2
    if (m >= 16) {
        __m128 lo0 = _mm_loadu_ps(x), lo1 = lo0, hi0 = lo0, hi1 = lo0;
        __m128 nan = _mm_setzero_ps();
        for (; i + 8 <= m; i += 8) {
            __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
            /* minps(a, lo) returns lo when a is NaN: NaN is caught below. */
            lo0 = _mm_min_ps(a, lo0);
            hi0 = _mm_max_ps(a, hi0);
            lo1 = _mm_min_ps(b, lo1);
            hi1 = _mm_max_ps(b, hi1);
            nan = _mm_or_ps(nan, _mm_cmpunord_ps(a, b));
        }
        float l[4], h[4];
        _mm_storeu_ps(l, _mm_min_ps(lo0, lo1));
        _mm_storeu_ps(h, _mm_max_ps(hi0, hi1));
        bad = _mm_movemask_ps(nan) != 0;
        lo = l[0];
        hi = h[0];
        for (int k = 1; k < 4; k++) {
            lo = l[k] < lo ? l[k] : lo;
            hi = h[k] > hi ? h[k] : hi;
        }
    }
#endif
    for (; i < m; i++) {
        float v = x[i];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        bad |= v != v;
    }
    *plo = lo;
    *phi = hi;
    *pbad = bad;
}

/* codes[i] = min(rint((x[i] - lo) / d), L) for i < m. A true division:
 * multiplying by a rounded 1/d and redoing blocks with a near-tie quotient
 * measured slower (with SSE2 and with AVX2). */
static void
quantize(const float *x, size_t m, float lo, float d, float levels, uint8_t *codes)
{
    for (size_t i = 0; i < m; i++) {
        float q = (x[i] - lo) / d;
        q = q < levels ? q : levels;
        /* q is in [0, L] (x - lo >= 0 exactly): round half to even. */
        q = (q + MAGIC) - MAGIC;
        codes[i] = (uint8_t)(int32_t)q;
    }
}

/* Two codes per byte, low nibble first; an odd count pads a zero nibble. */
static void
pack4(const uint8_t *codes, size_t m, uint8_t *out)
{
    size_t pairs = m / 2;
    for (size_t k = 0; k < pairs; k++) {
        out[k] = (uint8_t)(codes[2 * k] | (codes[2 * k + 1] << 4));
    }
    if (m % 2) {
        out[pairs] = codes[m - 1];
    }
}

static void
store_f32(uint8_t *p, float v)
{
    memcpy(p, &v, sizeof v);
}

static float
load_f32(const uint8_t *p)
{
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Encode n values; out has the exact encoded size. RC_OK or RC_INVALID. */
static int
encode_impl(const float *x, size_t n, size_t bs, int bits, uint8_t *out)
{
    const float levels = bits == 8 ? 255.0f : 15.0f;
    const size_t nb = n / bs + (n % bs != 0);
    uint8_t *codes = out + 8 * nb;
    uint8_t stage[CHUNK];
    size_t fill = 0;   /* uint4: codes staged in stage[] */
    size_t packed = 0; /* uint4: codes already packed (even) */

    for (size_t b = 0; b < nb; b++) {
        const size_t start = b * bs;
        const size_t m = n - start < bs ? n - start : bs;
        float lo, hi;
        int bad;
        block_minmax(x + start, m, &lo, &hi, &bad);
        if (bad) {
            return RC_INVALID;
        }
        lo = lo + 0.0f; /* -0 -> +0 */
        hi = hi + 0.0f;
        const float scale = (hi - lo) / levels;
        const float top = scale * levels + lo;
        if (!isfinite(top)) {
            return RC_INVALID;
        }
        store_f32(out + 4 * b, scale);
        store_f32(out + 4 * (nb + b), lo);
        const float d = scale > 0.0f ? scale : 1.0f;
        if (bits == 8) {
            quantize(x + start, m, lo, d, levels, codes + start);
            continue;
        }
        for (size_t pos = 0; pos < m;) {
            size_t k = m - pos < CHUNK - fill ? m - pos : CHUNK - fill;
            quantize(x + start + pos, k, lo, d, levels, stage + fill);
            fill += k;
            pos += k;
            if (fill == CHUNK) {
                pack4(stage, CHUNK, codes + packed / 2);
                packed += CHUNK;
                fill = 0;
            }
        }
    }
    if (bits == 4 && fill) {
        pack4(stage, fill, codes + packed / 2);
    }
    return RC_OK;
}

/* -- decode ----------------------------------------------------------------- */

static void
dequantize(const uint8_t *codes, size_t m, float scale, float lo, float *out)
{
    for (size_t i = 0; i < m; i++) {
        float v = (float)codes[i] * scale;
        out[i] = v + lo;
    }
}

static void
dequantize_add(const uint8_t *codes, size_t m, float scale, float lo, float *acc)
{
    for (size_t i = 0; i < m; i++) {
        float v = (float)codes[i] * scale;
        v = v + lo;
        acc[i] = acc[i] + v;
    }
}

static void
unpack4(const uint8_t *in, size_t nbytes, uint8_t *codes)
{
    for (size_t k = 0; k < nbytes; k++) {
        codes[2 * k] = in[k] & 0x0F;
        codes[2 * k + 1] = in[k] >> 4;
    }
}

/* Values [i0, i1) whose codes are at codes[0..): dequantize block by block. */
static void
decode_span(const uint8_t *hdr, size_t nb, size_t bs, const uint8_t *codes, size_t i0,
            size_t i1, float *out, float *acc)
{
    size_t i = i0;
    while (i < i1) {
        const size_t b = i / bs;
        const size_t end = (b + 1) * bs < i1 ? (b + 1) * bs : i1;
        const float scale = load_f32(hdr + 4 * b);
        const float lo = load_f32(hdr + 4 * (nb + b));
        if (acc) {
            dequantize_add(codes + (i - i0), end - i, scale, lo, acc + i);
        }
        else {
            dequantize(codes + (i - i0), end - i, scale, lo, out + i);
        }
        i = end;
    }
}

/* Decode n values from data (exact encoded size) into out, or add them to
 * acc when acc is not NULL. Validates everything before writing anything. */
static int
decode_impl(const uint8_t *data, size_t n, size_t bs, int bits, float *out, float *acc)
{
    const float levels = bits == 8 ? 255.0f : 15.0f;
    const size_t nb = n / bs + (n % bs != 0);
    const uint8_t *codes = data + 8 * nb;
    int ok = 1;
    for (size_t b = 0; b < nb; b++) {
        const float scale = load_f32(data + 4 * b);
        const float lo = load_f32(data + 4 * (nb + b));
        const float top = scale * levels + lo;
        ok &= isfinite(top) && scale >= 0.0f;
    }
    if (!ok || (bits == 4 && n % 2 && codes[n / 2] >> 4)) {
        return RC_INVALID;
    }
    if (bits == 8) {
        decode_span(data, nb, bs, codes, 0, n, out, acc);
        return RC_OK;
    }
    uint8_t stage[CHUNK];
    for (size_t c0 = 0; c0 < n; c0 += CHUNK) {
        const size_t c1 = n - c0 < CHUNK ? n : c0 + CHUNK;
        unpack4(codes + c0 / 2, (c1 - c0 + 1) / 2, stage);
        decode_span(data, nb, bs, stage, c0, c1, out, acc);
    }
    return RC_OK;
}

/* -- Python glue ------------------------------------------------------------ */

static int
check_params(Py_ssize_t n, Py_ssize_t bs, int bits)
{
    if (n < 0 || bs < 1 || (bits != 4 && bits != 8)) {
        PyErr_SetString(PyExc_ValueError, "need n >= 0, block_size >= 1, bits 4 or 8");
        return -1;
    }
    return 0;
}

static Py_ssize_t
encoded_size(Py_ssize_t n, Py_ssize_t bs, int bits)
{
    Py_ssize_t nb = n / bs + (n % bs != 0);
    return 8 * nb + (bits == 8 ? n : (n + 1) / 2);
}

static int
misaligned(const void *p)
{
    return ((uintptr_t)p) % _Alignof(float) != 0;
}

static int
overlap(const Py_buffer *a, const Py_buffer *b)
{
    uintptr_t a0 = (uintptr_t)a->buf, b0 = (uintptr_t)b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + (uintptr_t)b->len &&
           b0 < a0 + (uintptr_t)a->len;
}

PyDoc_STRVAR(encode_doc,
             "encode(x, out, n, block_size, bits) -> int\n\n"
             "Quantize n float32 values from buffer x into buffer out (exactly the\n"
             "encoded size). Returns 0, 1 when the input has a non-finite value or a\n"
             "block range overflows (out is then garbage), 2 when x is misaligned or\n"
             "overlaps out (nothing written).");

static PyObject *
mm_encode(PyObject *self, PyObject *args)
{
    Py_buffer x, out;
    Py_ssize_t n, bs;
    int bits, rc;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*nni:encode", &x, &out, &n, &bs, &bits)) {
        return NULL;
    }
    if (check_params(n, bs, bits) < 0) {
        goto fail;
    }
    if (n > PY_SSIZE_T_MAX / 8 || x.len != 4 * n || out.len != encoded_size(n, bs, bits)) {
        PyErr_SetString(PyExc_ValueError, "encode: buffer sizes do not match n");
        goto fail;
    }
    if (misaligned(x.buf) || overlap(&x, &out)) {
        rc = RC_FALLBACK;
    }
    else {
        Py_BEGIN_ALLOW_THREADS
        rc = encode_impl((const float *)x.buf, (size_t)n, (size_t)bs, bits, (uint8_t *)out.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return PyLong_FromLong(rc);
fail:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return NULL;
}

PyDoc_STRVAR(decode_doc,
             "decode(data, n, block_size, bits, out, acc) -> int\n\n"
             "Dequantize n values from buffer data (exactly the encoded size) into\n"
             "float32 buffer out, or, when acc is not None, add them to float32\n"
             "buffer acc (out is then not written). Returns 0, 1 when the header or\n"
             "padding is invalid (nothing written), 2 when the float buffer written\n"
             "is misaligned or overlaps data (nothing written).");

static PyObject *
mm_decode(PyObject *self, PyObject *args)
{
    Py_buffer data, out, acc;
    PyObject *acc_obj;
    Py_ssize_t n, bs;
    int bits, rc, have_acc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nniw*O:decode", &data, &n, &bs, &bits, &out, &acc_obj)) {
        return NULL;
    }
    if (acc_obj != Py_None) {
        if (PyObject_GetBuffer(acc_obj, &acc, PyBUF_WRITABLE) < 0) {
            PyBuffer_Release(&data);
            PyBuffer_Release(&out);
            return NULL;
        }
        have_acc = 1;
    }
    if (check_params(n, bs, bits) < 0) {
        goto fail;
    }
    if (n > PY_SSIZE_T_MAX / 8 || data.len != encoded_size(n, bs, bits) || out.len != 4 * n ||
        (have_acc && acc.len != 4 * n)) {
        PyErr_SetString(PyExc_ValueError, "decode: buffer sizes do not match n");
        goto fail;
    }
    if (have_acc ? misaligned(acc.buf) || overlap(&data, &acc)
                 : misaligned(out.buf) || overlap(&data, &out)) {
        rc = RC_FALLBACK;
    }
    else {
        float *accp = have_acc ? (float *)acc.buf : NULL;
        Py_BEGIN_ALLOW_THREADS
        rc = decode_impl((const uint8_t *)data.buf, (size_t)n, (size_t)bs, bits,
                         (float *)out.buf, accp);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (have_acc) {
        PyBuffer_Release(&acc);
    }
    return PyLong_FromLong(rc);
fail:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (have_acc) {
        PyBuffer_Release(&acc);
    }
    return NULL;
}

static PyMethodDef mm_methods[] = {
    {"encode", mm_encode, METH_VARARGS, encode_doc},
    {"decode", mm_decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot mm_slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef mm_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "collnet.codec._minmax",
    .m_doc = "C kernels for collnet.codec.minmax (bit-identical to its numpy path).",
    .m_size = 0,
    .m_methods = mm_methods,
    .m_slots = mm_slots,
};

PyMODINIT_FUNC
PyInit__minmax(void)
{
    return PyModuleDef_Init(&mm_module);
}
