/*
 * replicator.restore._rows -- the native form of the restore's per-row work
 * (see replicator.restore.rowcodec, which holds the Python reference and the wiring).
 *
 * encode_chunk: live keys in key order -> target rows (PostgreSQL or SQLite values) and
 *   the backup side of the state digest, in one pass over each event.
 * digest_rows:  rows read back from a target -> the target side of the state digest.
 *
 * Only plain values are converted here: strings, ints, floats, bools, None, and RFC 3339
 * UTC timestamps of the form YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z. Everything else goes to the
 * Python reference converters passed in `helpers` (per value, or per row when the event
 * itself is unusual), so the results are those of the reference for every input. The
 * digest of a row is BLAKE2b-128 of orjson.dumps((key, *canonical values)), summed modulo
 * 2**128 (docs/FORMAT.md 6.4): orjson is called (its bytes are the definition), BLAKE2b is
 * computed here (RFC 7693; tests compare it with hashlib).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <limits.h>

enum { K_TEXT = 0, K_TS = 1, K_BIGINT = 2, K_DOUBLE = 3, K_BOOL = 4, K_JSONB = 5 };
enum { T_PG = 0, T_SQLITE = 1, T_PGBIN = 2 /* T_PG rows, returned as binary COPY data */ };

typedef unsigned __int128 u128;

/* helpers tuple layout (built by rowcodec.py) */
enum {
    H_LOADS, H_DUMPS, H_SORTKW, H_UTC,
    H_TS_TARGET,  /* value -> target timestamp (reference) */
    H_TS_CANON,   /* value -> canonical micros (reference) */
    H_SLOW_ROW,   /* (key, value, topic, partition, offset) -> (row, canonical tuple) */
    H_STORED,     /* (kind code, value) -> canonical from a stored value (reference) */
    H_DT_MICROS,  /* aware datetime -> microseconds since the epoch (reference) */
    H_JSONB,      /* JSON text (bytes) -> (orjson.dumps(v), sorted-key dumps(v)) (reference) */
    H_COUNT
};

static PyObject *s_data, *s_version, *s_ts;

/* -- timestamps --------------------------------------------------------------------- */

static int days_in_month(int y, int m) {
    static const int d[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) return 29;
    return d[m - 1];
}

/* days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm) */
static long long days_from_civil(int y, int m, int d) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

typedef struct { int y, mo, d, h, mi, s, us; } tm_t;

static inline int dig(const char *p, int n) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z, a valid date and time without a leap second: 1, else 0 */
static int parse_ts_bytes(const char *p, Py_ssize_t n, tm_t *t) {
    if (n < 20 || p[4] != '-' || p[7] != '-' || p[10] != 'T' || p[13] != ':' ||
        p[16] != ':' || p[n - 1] != 'Z')
        return 0;
    t->y = dig(p, 4); t->mo = dig(p + 5, 2); t->d = dig(p + 8, 2);
    t->h = dig(p + 11, 2); t->mi = dig(p + 14, 2); t->s = dig(p + 17, 2);
    if (t->y < 1 || t->mo < 1 || t->mo > 12 || t->d < 1 || t->h < 0 || t->h > 23 ||
        t->mi < 0 || t->mi > 59 || t->s < 0 || t->s > 59)
        return 0;
    if (t->d > days_in_month(t->y, t->mo)) return 0;
    t->us = 0;
    if (n == 20) return 1;
    Py_ssize_t f = n - 21; /* digits between '.' and 'Z' */
    if (p[19] != '.' || f < 1 || f > 6) return 0;
    int v = dig(p + 20, (int)f);
    if (v < 0) return 0;
    for (Py_ssize_t i = f; i < 6; i++) v *= 10;
    t->us = v;
    return 1;
}

static int parse_ts(PyObject *str, tm_t *t) {
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(str, &n);
    if (p == NULL) { PyErr_Clear(); return 0; }
    return parse_ts_bytes(p, n, t);
}

static long long tm_micros(const tm_t *t) {
    return ((days_from_civil(t->y, t->mo, t->d) * 86400LL) + t->h * 3600LL + t->mi * 60LL +
            t->s) * 1000000LL + t->us;
}

static PyObject *tm_datetime(const tm_t *t, PyObject *utc) {
    return PyDateTimeAPI->DateTime_FromDateAndTime(t->y, t->mo, t->d, t->h, t->mi, t->s,
                                                   t->us, utc, PyDateTimeAPI->DateTimeType);
}

/* the canonical timestamp text YYYY-MM-DDTHH:MM:SS.ffffffZ (27 characters) into buf */
static inline void put_digits(char *p, int v, int n) {
    for (int i = n - 1; i >= 0; i--) { p[i] = (char)('0' + v % 10); v /= 10; }
}

static void tm_format(const tm_t *t, char buf[32]) {
    memcpy(buf, "0000-00-00T00:00:00.000000Z", 28);
    put_digits(buf, t->y, 4);
    put_digits(buf + 5, t->mo, 2);
    put_digits(buf + 8, t->d, 2);
    put_digits(buf + 11, t->h, 2);
    put_digits(buf + 14, t->mi, 2);
    put_digits(buf + 17, t->s, 2);
    put_digits(buf + 20, t->us, 6);
}

static PyObject *tm_text(const tm_t *t) {
    char buf[32];
    tm_format(t, buf);
    return PyUnicode_FromStringAndSize(buf, 27);
}

/* -- BLAKE2b-128 (RFC 7693), unkeyed ------------------------------------------------- */

static const uint64_t B2_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

#define B2_G(a, b, c, d, x, y)                                                               \
    do {                                                                                      \
        v[a] = v[a] + v[b] + (x); v[d] = rotr64(v[d] ^ v[a], 32);                            \
        v[c] = v[c] + v[d];       v[b] = rotr64(v[b] ^ v[c], 24);                            \
        v[a] = v[a] + v[b] + (y); v[d] = rotr64(v[d] ^ v[a], 16);                            \
        v[c] = v[c] + v[d];       v[b] = rotr64(v[b] ^ v[c], 63);                            \
    } while (0)

static void b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(&m[i], block + i * 8, 8);
#else
        uint64_t w = 0;
        for (int j = 7; j >= 0; j--) w = (w << 8) | block[i * 8 + j];
        m[i] = w;
#endif
    }
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = B2_IV[i]; }
    v[12] ^= t; /* inputs here are far below 2**64 bytes: the high counter word stays 0 */
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = B2_SIGMA[r];
        B2_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b with a 16-byte digest of data[0:n], read as a big-endian 128-bit integer */
static u128 blake2b_128(const uint8_t *data, size_t n) {
    uint64_t h[8];
    for (int i = 0; i < 8; i++) h[i] = B2_IV[i];
    h[0] ^= 0x01010000ULL ^ 16; /* depth 1, fanout 1, no key, 16-byte digest */
    size_t done = 0;
    while (n - done > 128) {
        b2_compress(h, data + done, done + 128, 0);
        done += 128;
    }
    uint8_t last[128] = {0};
    memcpy(last, data + done, n - done);
    b2_compress(h, last, n, 1);
    u128 v = 0;
    for (int i = 0; i < 16; i++) v = (v << 8) | (uint8_t)(h[i / 8] >> (8 * (i % 8)));
    return v;
}

static PyObject *py_blake2b_128(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    u128 v = blake2b_128(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return Py_BuildValue("(KK)", (unsigned long long)(v >> 64), (unsigned long long)v);
}

/* -- digest ------------------------------------------------------------------------- */

/* add BLAKE2b-128(orjson.dumps(canon)) to *acc; 0 on success */
static int digest_add(PyObject *canon, PyObject **h, u128 *acc) {
    PyObject *b = PyObject_CallOneArg(h[H_DUMPS], canon);
    if (b == NULL) return -1;
    if (!PyBytes_Check(b)) {
        Py_DECREF(b);
        PyErr_SetString(PyExc_TypeError, "digest: dumps must return bytes");
        return -1;
    }
    *acc += blake2b_128((const uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return 0;
}

static PyObject *sum_result(Py_ssize_t count, u128 acc, PyObject *rows) {
    unsigned long long hi = (unsigned long long)(acc >> 64), lo = (unsigned long long)acc;
    if (rows != NULL) return Py_BuildValue("(OnKK)", rows, count, hi, lo);
    return Py_BuildValue("(nKK)", count, hi, lo);
}

/* -- PostgreSQL binary COPY rows ---------------------------------------------------- */

typedef struct { char *p; Py_ssize_t len, cap; } buf_t;

static int buf_reserve(buf_t *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + more) cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline void put_be(buf_t *b, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) b->p[b->len++] = (char)(v >> (8 * i));
}

static int put_bytes(buf_t *b, const char *data, Py_ssize_t n, int jsonb) {
    if (n + jsonb > INT32_MAX) { PyErr_SetString(PyExc_OverflowError, "value too long"); return -1; }
    if (buf_reserve(b, 4 + jsonb + n) < 0) return -1;
    put_be(b, (uint64_t)(n + jsonb), 4);
    if (jsonb) b->p[b->len++] = 1; /* jsonb binary format version */
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

#define PG_EPOCH_US 946684800000000LL /* 2000-01-01 in microseconds since 1970-01-01 */

/* one value of the row in binary COPY form (the types of the table, see layout.py) */
static int put_value(buf_t *b, int kind, PyObject *v, PyObject **h) {
    if (v == Py_None) {
        if (buf_reserve(b, 4) < 0) return -1;
        put_be(b, 0xFFFFFFFFu, 4);
        return 0;
    }
    switch (kind) {
    case K_TEXT:
    case K_JSONB: {
        if (!PyUnicode_Check(v)) {
            PyErr_Format(PyExc_TypeError, "expected str, got %s", Py_TYPE(v)->tp_name);
            return -1;
        }
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(v, &n);
        if (u == NULL) return -1;
        return put_bytes(b, u, n, kind == K_JSONB);
    }
    case K_TS: {
        long long us;
        if (PyDateTime_CheckExact(v) && PyDateTime_DATE_GET_TZINFO(v) == h[H_UTC]) {
            tm_t t = {PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v),
                      PyDateTime_DATE_GET_HOUR(v), PyDateTime_DATE_GET_MINUTE(v),
                      PyDateTime_DATE_GET_SECOND(v), PyDateTime_DATE_GET_MICROSECOND(v)};
            us = tm_micros(&t);
        } else {
            PyObject *m = PyObject_CallOneArg(h[H_DT_MICROS], v);
            if (m == NULL) return -1;
            us = PyLong_AsLongLong(m);
            Py_DECREF(m);
            if (us == -1 && PyErr_Occurred()) return -1;
        }
        if (buf_reserve(b, 12) < 0) return -1;
        put_be(b, 8, 4);
        put_be(b, (uint64_t)(us - PG_EPOCH_US), 8);
        return 0;
    }
    case K_BIGINT: {
        if (!PyLong_Check(v)) {
            PyErr_Format(PyExc_TypeError, "expected int, got %s", Py_TYPE(v)->tp_name);
            return -1;
        }
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) return -1;
        if (buf_reserve(b, 12) < 0) return -1;
        put_be(b, 8, 4);
        put_be(b, (uint64_t)x, 8);
        return 0;
    }
    case K_DOUBLE: {
        if (!PyFloat_Check(v) && !PyLong_Check(v)) {
            PyErr_Format(PyExc_TypeError, "expected float, got %s", Py_TYPE(v)->tp_name);
            return -1;
        }
        double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred()) return -1;
        uint64_t bits;
        memcpy(&bits, &d, 8);
        if (buf_reserve(b, 12) < 0) return -1;
        put_be(b, 8, 4);
        put_be(b, bits, 8);
        return 0;
    }
    case K_BOOL:
        if (!PyBool_Check(v)) {
            PyErr_Format(PyExc_TypeError, "expected bool, got %s", Py_TYPE(v)->tp_name);
            return -1;
        }
        if (buf_reserve(b, 5) < 0) return -1;
        put_be(b, 1, 4);
        b->p[b->len++] = v == Py_True;
        return 0;
    }
    PyErr_SetString(PyExc_ValueError, "unknown column kind");
    return -1;
}

/* a whole row tuple (key, data columns..., _version, _topic, _partition, _offset, _ts) */
static int put_row(buf_t *b, PyObject *row, const int *kinds, Py_ssize_t ncols, PyObject **h) {
    static const int meta[5] = {K_BIGINT, K_TEXT, K_BIGINT, K_BIGINT, K_TS};
    Py_ssize_t n = ncols + 6;
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != n) {
        PyErr_SetString(PyExc_TypeError, "a row has the table's columns");
        return -1;
    }
    if (buf_reserve(b, 2) < 0) return -1;
    put_be(b, (uint64_t)n, 2);
    for (Py_ssize_t i = 0; i < n; i++) {
        int kind = i == 0 ? K_TEXT : i <= ncols ? kinds[i - 1] : meta[i - ncols - 1];
        if (put_value(b, kind, PyTuple_GET_ITEM(row, i), h) < 0) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            PyErr_Format(PyExc_ValueError, "column %zd: %S", i, ev ? ev : Py_None);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            return -1;
        }
    }
    return 0;
}

/* -- encode_chunk ------------------------------------------------------------------- */

/* one data value -> (*target, *canon), new references; 1 done, 0 the row needs the slow
 * path, -1 error */
static int convert_value(int kind, int target, PyObject *v, PyObject **h, PyObject **tv,
                         PyObject **cv) {
    *tv = *cv = NULL;
    if (v == NULL || v == Py_None) {
        *tv = Py_NewRef(Py_None);
        *cv = Py_NewRef(Py_None);
        return 1;
    }
    switch (kind) {
    case K_TEXT:
        if (!PyUnicode_CheckExact(v)) return 0;
        *tv = Py_NewRef(v);
        *cv = Py_NewRef(v);
        return 1;
    case K_TS: {
        if (!PyUnicode_CheckExact(v)) return 0;
        tm_t t;
        if (!parse_ts(v, &t)) {
            *tv = PyObject_CallOneArg(h[H_TS_TARGET], v);
            if (*tv == NULL) return -1;
            *cv = PyObject_CallOneArg(h[H_TS_CANON], v);
            return *cv == NULL ? -1 : 1;
        }
        *tv = target == T_PG ? tm_datetime(&t, h[H_UTC]) : tm_text(&t);
        *cv = PyLong_FromLongLong(tm_micros(&t));
        return (*tv == NULL || *cv == NULL) ? -1 : 1;
    }
    case K_BIGINT:
        if (!PyLong_CheckExact(v)) return 0;
        *tv = Py_NewRef(v);
        *cv = Py_NewRef(v);
        return 1;
    case K_DOUBLE:
        if (PyFloat_CheckExact(v)) {
            *tv = Py_NewRef(v);
            *cv = Py_NewRef(v);
            return 1;
        }
        if (!PyLong_CheckExact(v)) return 0;
        *tv = PyNumber_Float(v);
        if (*tv == NULL) return -1;
        *cv = Py_NewRef(*tv);
        return 1;
    case K_BOOL:
        if (!PyBool_Check(v)) return 0;
        *tv = target == T_PG ? Py_NewRef(v) : PyLong_FromLong(v == Py_True);
        *cv = Py_NewRef(v);
        return *tv == NULL ? -1 : 1;
    case K_JSONB: {
        PyObject *sorted = PyObject_VectorcallDict(h[H_DUMPS], &v, 1, h[H_SORTKW]);
        if (sorted == NULL) return -1;
        *cv = PyUnicode_FromEncodedObject(sorted, "utf-8", "strict");
        Py_DECREF(sorted);
        if (*cv == NULL) return -1;
        if (target == T_SQLITE) {
            *tv = Py_NewRef(*cv);
            return 1;
        }
        PyObject *plain = PyObject_CallOneArg(h[H_DUMPS], v);
        if (plain == NULL) return -1;
        *tv = PyUnicode_FromEncodedObject(plain, "utf-8", "strict");
        Py_DECREF(plain);
        return *tv == NULL ? -1 : 1;
    }
    }
    return 0;
}

/* the event's target row and canonical tuple the fast way; 1 done, 0 slow path, -1 error */
static int fast_row(PyObject *key, PyObject *value, PyObject *topic, PyObject *partition,
                    PyObject *offset, PyObject *names, const int *kinds, Py_ssize_t ncols,
                    int target, PyObject **h, PyObject **row_out, PyObject **canon_out) {
    PyObject *ev = PyObject_CallOneArg(h[H_LOADS], value);
    if (ev == NULL) { PyErr_Clear(); return 0; }
    int ok = 0;
    PyObject *row = NULL, *canon = NULL;
    if (!PyDict_CheckExact(ev)) goto out;
    PyObject *data = PyDict_GetItemWithError(ev, s_data);
    if (data == NULL && PyErr_Occurred()) { ok = -1; goto out; }
    int empty = data == NULL || data == Py_None;
    if (!empty && !PyDict_CheckExact(data)) goto out; /* the reference's `or {}` and .get */
    if (!empty && PyDict_GET_SIZE(data) == 0) empty = 1;
    row = PyTuple_New(ncols + 6);
    canon = PyTuple_New(ncols + 1);
    if (row == NULL || canon == NULL) { ok = -1; goto out; }
    PyTuple_SET_ITEM(row, 0, Py_NewRef(key));
    PyTuple_SET_ITEM(canon, 0, Py_NewRef(key));
    for (Py_ssize_t i = 0; i < ncols; i++) {
        PyObject *v = NULL;
        if (!empty) {
            v = PyDict_GetItemWithError(data, PyTuple_GET_ITEM(names, i));
            if (v == NULL && PyErr_Occurred()) { ok = -1; goto out; }
        }
        PyObject *tv, *cv;
        int r = convert_value(kinds[i], target, v, h, &tv, &cv);
        if (r <= 0) {
            Py_XDECREF(tv);
            Py_XDECREF(cv);
            ok = r;
            goto out;
        }
        PyTuple_SET_ITEM(row, i + 1, tv);
        PyTuple_SET_ITEM(canon, i + 1, cv);
    }
    PyObject *version = PyDict_GetItemWithError(ev, s_version);
    if (version == NULL && PyErr_Occurred()) { ok = -1; goto out; }
    PyObject *ts = PyDict_GetItemWithError(ev, s_ts);
    if (ts == NULL && PyErr_Occurred()) { ok = -1; goto out; }
    PyObject *tsv;
    if (ts != NULL && PyUnicode_Check(ts)) {
        tm_t t;
        if (PyUnicode_CheckExact(ts) && parse_ts(ts, &t))
            tsv = target == T_PG ? tm_datetime(&t, h[H_UTC]) : tm_text(&t);
        else
            tsv = PyObject_CallOneArg(h[H_TS_TARGET], ts);
        if (tsv == NULL) { ok = -1; goto out; }
    } else {
        tsv = Py_NewRef(Py_None);
    }
    PyTuple_SET_ITEM(row, ncols + 1, Py_NewRef(version ? version : Py_None));
    PyTuple_SET_ITEM(row, ncols + 2, Py_NewRef(topic));
    PyTuple_SET_ITEM(row, ncols + 3, Py_NewRef(partition));
    PyTuple_SET_ITEM(row, ncols + 4, Py_NewRef(offset));
    PyTuple_SET_ITEM(row, ncols + 5, tsv);
    ok = 1;
out:
    Py_DECREF(ev);
    if (ok == 1) {
        *row_out = row;
        *canon_out = canon;
    } else {
        Py_XDECREF(row);
        Py_XDECREF(canon);
    }
    return ok;
}

/* -- the raw path: event bytes -> row and digest, no Python object per value ------------
 *
 * A strict scanner of the event's JSON text. It takes only the plain case and answers 0
 * ("not plain": the caller uses the orjson path above, which gives the reference's
 * result) for everything else: any backslash escape anywhere in the event, a control
 * character or invalid UTF-8 in a string, a number of more than 18 integer digits or one
 * that is not finite, nesting deeper than 64, a top level that is not one object, a value
 * of a type the column does not take plainly. What it accepts, orjson accepts with the
 * same meaning (duplicate names: the last wins, as in orjson), so the rows and digests are
 * those of the orjson path, byte for byte (tests compare the two on hostile events). */

enum { J_NULL = 1, J_STR, J_INT, J_FLOAT, J_TRUE, J_FALSE, J_OBJ, J_ARR };

typedef struct { const unsigned char *p; Py_ssize_t n; int type; } jv_t;
typedef struct { const unsigned char *p, *e; int depth; } js_t;

#define JS_MAX_DEPTH 64

static inline void js_ws(js_t *s) {
    while (s->p < s->e && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
        s->p++;
}

/* a string without escapes (s->p at its opening quote): valid UTF-8, no control character */
static int js_string(js_t *s, jv_t *v) {
    const unsigned char *p = s->p + 1, *e = s->e, *start = p;
    while (p < e) {
        /* eight plain ASCII bytes at a time: none is '"', '\\', < 0x20 or >= 0x80 */
        while (e - p >= 8) {
            uint64_t x;
            memcpy(&x, p, 8);
            const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
            uint64_t q = x ^ (ones * '"'), b = x ^ (ones * '\\');
            uint64_t special = ((x - ones * 0x20) | (q - ones) | (b - ones) | x) & high;
            if (special) break;
            p += 8;
        }
        if (p >= e) break;
        unsigned char c = *p;
        if (c == '"') {
            v->p = start; v->n = p - start; v->type = J_STR;
            s->p = p + 1;
            return 0;
        }
        if (c == '\\' || c < 0x20) return -1;
        if (c < 0x80) { p++; continue; }
        int len;
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) len = 3;
        else if (c >= 0xF0 && c <= 0xF4) len = 4;
        else return -1;
        if (e - p < len) return -1;
        for (int i = 1; i < len; i++)
            if ((p[i] & 0xC0) != 0x80) return -1;
        if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0) ||  /* overlong, surrogate */
            (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90))    /* overlong, > U+10FFFF */
            return -1;
        p += len;
    }
    return -1;
}

/* valid UTF-8 (no overlong form, no surrogate, nothing above U+10FFFF): 1, else 0 */
static int utf8_valid(const unsigned char *p, Py_ssize_t n) {
    const unsigned char *e = p + n;
    while (p < e) {
        unsigned char c = *p;
        if (c < 0x80) { p++; continue; }
        int len;
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) len = 3;
        else if (c >= 0xF0 && c <= 0xF4) len = 4;
        else return 0;
        if (e - p < len) return 0;
        for (int i = 1; i < len; i++)
            if ((p[i] & 0xC0) != 0x80) return 0;
        if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0) ||
            (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90))
            return 0;
        p += len;
    }
    return 1;
}

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* RFC 8259 number; integers of at most 18 digits, finite floats */
static int js_number(js_t *s, jv_t *v) {
    const unsigned char *p = s->p, *e = s->e, *start = p;
    int is_int = 1, exp = 0;
    if (p < e && *p == '-') p++;
    const unsigned char *digits = p;
    if (p < e && *p == '0') p++;
    else if (p < e && *p >= '1' && *p <= '9') { while (p < e && is_digit(*p)) p++; }
    else return -1;
    Py_ssize_t nint = p - digits;
    if (p < e && *p == '.') {
        is_int = 0;
        const unsigned char *d = ++p;
        while (p < e && is_digit(*p)) p++;
        if (p == d) return -1;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        is_int = 0; exp = 1;
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        const unsigned char *d = p;
        while (p < e && is_digit(*p)) p++;
        if (p == d) return -1;
    }
    if (is_int && nint > 18) return -1;
    if (!is_int && (exp || nint > 300)) { /* could be infinite, which orjson refuses */
        char tmp[64];
        if (p - start >= (Py_ssize_t)sizeof tmp) return -1;
        memcpy(tmp, start, p - start);
        tmp[p - start] = 0;
        char *end;
        double d = PyOS_string_to_double(tmp, &end, NULL);
        if (d == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
        if (end != tmp + (p - start) || !isfinite(d)) return -1;
    }
    v->p = start; v->n = p - start; v->type = is_int ? J_INT : J_FLOAT;
    s->p = p;
    return 0;
}

static int js_value(js_t *s, jv_t *v);

/* an object or array (s->p at its bracket); members validated, not interpreted */
static int js_container(js_t *s) {
    if (++s->depth > JS_MAX_DEPTH) return -1;
    int obj = *s->p == '{';
    unsigned char close = obj ? '}' : ']';
    s->p++;
    js_ws(s);
    if (s->p < s->e && *s->p == close) { s->p++; s->depth--; return 0; }
    for (;;) {
        jv_t k, v;
        if (obj) {
            if (s->p >= s->e || *s->p != '"' || js_string(s, &k) < 0) return -1;
            js_ws(s);
            if (s->p >= s->e || *s->p != ':') return -1;
            s->p++;
            js_ws(s);
        }
        if (js_value(s, &v) < 0) return -1;
        js_ws(s);
        if (s->p >= s->e) return -1;
        if (*s->p == ',') { s->p++; js_ws(s); continue; }
        if (*s->p == close) { s->p++; s->depth--; return 0; }
        return -1;
    }
}

static int js_lit(js_t *s, jv_t *v, const char *lit, int n, int type) {
    if (s->e - s->p < n || memcmp(s->p, lit, n) != 0) return -1;
    v->p = s->p; v->n = n; v->type = type;
    s->p += n;
    return 0;
}

/* one value at s->p (whitespace skipped); its span and type in *v */
static int js_value(js_t *s, jv_t *v) {
    if (s->p >= s->e) return -1;
    const unsigned char *start = s->p;
    switch (*s->p) {
    case '"': return js_string(s, v);
    case '{':
    case '[':
        if (js_container(s) < 0) return -1;
        v->p = start; v->n = s->p - start; v->type = *start == '{' ? J_OBJ : J_ARR;
        return 0;
    case 't': return js_lit(s, v, "true", 4, J_TRUE);
    case 'f': return js_lit(s, v, "false", 5, J_FALSE);
    case 'n': return js_lit(s, v, "null", 4, J_NULL);
    default: return js_number(s, v);
    }
}

/* the members of the object at s->p, one per call: 1 with name and value, 0 at its end,
 * -1 not plain. `*first` starts at 1. */
static int js_member(js_t *s, int *first, jv_t *name, jv_t *value) {
    if (*first) {
        if (s->p >= s->e || *s->p != '{') return -1;
        s->p++;
        js_ws(s);
        if (s->p < s->e && *s->p == '}') { s->p++; return 0; }
        *first = 0;
    } else {
        js_ws(s);
        if (s->p >= s->e) return -1;
        if (*s->p == '}') { s->p++; return 0; }
        if (*s->p != ',') return -1;
        s->p++;
        js_ws(s);
    }
    if (s->p >= s->e || *s->p != '"' || js_string(s, name) < 0) return -1;
    js_ws(s);
    if (s->p >= s->e || *s->p != ':') return -1;
    s->p++;
    js_ws(s);
    return js_value(s, value) < 0 ? -1 : 1;
}

/* -- digest text (orjson's bytes for the canonical tuple) --------------------------------- */

static inline int buf_put(buf_t *b, const void *p, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

/* a JSON string as orjson writes it: `"` and `\` escaped, control characters as \b \t \n
 * \f \r or \u00xx; everything else (valid UTF-8) as it is */
static int dj_str(buf_t *b, const unsigned char *p, Py_ssize_t n) {
    if (buf_reserve(b, 2 + 6 * n) < 0) return -1;
    char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 0x20 && c != '"' && c != '\\') { *o++ = (char)c; continue; }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default: {
            static const char hex[] = "0123456789abcdef";
            *o++ = 'u'; *o++ = '0'; *o++ = '0';
            *o++ = hex[c >> 4]; *o++ = hex[c & 15];
        }
        }
    }
    *o++ = '"';
    b->len = o - b->p;
    return 0;
}

static int dj_int(buf_t *b, long long v) {
    char tmp[24];
    int n = 24;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { tmp[--n] = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) tmp[--n] = '-';
    return buf_put(b, tmp + n, 24 - n);
}

/* a float as orjson writes it: Python's repr when that has no exponent (tests compare
 * the two), else orjson itself */
static int dj_double(buf_t *b, double d, PyObject **h) {
    char *r = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (r == NULL) return -1;
    if (strchr(r, 'e') == NULL && strchr(r, 'n') == NULL) { /* not 1e+20, inf, nan */
        int bad = buf_put(b, r, (Py_ssize_t)strlen(r));
        PyMem_Free(r);
        return bad;
    }
    PyMem_Free(r);
    PyObject *f = PyFloat_FromDouble(d);
    if (f == NULL) return -1;
    PyObject *o = PyObject_CallOneArg(h[H_DUMPS], f);
    Py_DECREF(f);
    if (o == NULL) return -1;
    int bad = buf_put(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    Py_DECREF(o);
    return bad;
}

/* -- canonical JSON ------------------------------------------------------------------------ */

/* Whether a decimal literal of 16 or 17 significant digits, value M * 10^-F (M without
 * trailing zeros, 1 <= F <= 21), is repr() of the double d it reads as, decided exactly
 * with 128-bit integers (no Python, no bignum): 1 it is, 0 it is not or undecided (the
 * caller then compares with repr itself; 0 is always safe, 1 must be exact).
 *
 * repr(d) is the shortest digit string that reads back as d and, of those, the one
 * nearest d. So the literal L is repr(d) when
 *   (a) L lies in d's rounding interval (it reads back as d),
 *   (b) no multiple of 10^(1-F) (any string with fewer digits at this scale) lies in it,
 *   (c) L is strictly the nearest multiple of 10^-F to d (no other string of its length
 *       is nearer; a tie is left undecided).
 * With d = m * 2^k (m of 53 bits) everything is scaled by S = 2^(2-k) * 10^F, so that
 *   d*S = 4mP, the interval is [(4m-2)P, (4m+2)P] ((4m-1)P below a power of two, whose
 *   lower neighbour is nearer), endpoints included when m is even (ties round to even),
 *   L*S = M * 2^(2-k), and a step of 10^-F is 2^(2-k) (P = 10^F).
 * Tests compare it with repr over millions of doubles. */
static int dec_is_repr(uint64_t M, int F, double d) {
    static const uint64_t pow10[20] = {
        1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
        100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL, 1000000000000ULL,
        10000000000000ULL, 100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
        100000000000000000ULL, 1000000000000000000ULL, 10000000000000000000ULL};
    if (!(d > 0) || !isfinite(d) || F < 1 || F > 21) return 0;
    int e2;
    double f = frexp(d, &e2);                /* d = f * 2^e2, 0.5 <= f < 1 */
    if (e2 < -1021) return 0;                /* subnormal: not handled */
    uint64_t m = (uint64_t)ldexp(f, 53);     /* exact: d = m * 2^(e2 - 53) */
    int k = e2 - 53, sh = 2 - k;
    u128 P = F <= 19 ? (u128)pow10[F] : (u128)pow10[F - 2] * 100;
    /* sizes: 4mP < 2^55 * 2^70; L*S is within the interval, so of the same size */
    if (M == 0 || sh < 0 || (P >> 70) != 0 || 64 - __builtin_clzll(M) + sh > 120)
        return 0; /* M << sh and 10 << sh inside 128 bits */
    int pow2 = m == (1ULL << 52);
    u128 D = ((u128)m << 2) * P;
    u128 hi = D + 2 * P, lo = D - (pow2 ? P : 2 * P);
    int incl = (m & 1) == 0;
    u128 L = (u128)M << sh, step = (u128)1 << sh;
    /* (a) */
    if (incl ? (L < lo || L > hi) : (L <= lo || L >= hi)) return 0;
    /* (c): |L - D| < step / 2 */
    u128 dist = L > D ? L - D : D - L;
    if (dist * 2 >= step) return 0;
    /* (b): the multiples of 10*step on either side of D */
    u128 big = step * 10;
    u128 below = D / big * big, above = below + big;
    if (incl ? (below >= lo) : (below > lo)) return 0;
    if (incl ? (above <= hi) : (above < hi)) return 0;
    return 1;
}

/* the literal (no exponent) of 16 or 17 significant digits, at most 3 zeros after "0.",
 * no trailing zero, is repr() of d, decided by dec_is_repr: 1, else 0 (not decided) */
static int literal_is_repr(const unsigned char *p, Py_ssize_t n, double d) {
    const unsigned char *q = p, *e = p + n;
    if (q < e && *q == '-') q++;
    const unsigned char *dot = memchr(q, '.', e - q);
    if (dot == NULL || dot == q || dot + 1 >= e || e[-1] == '0') return 0;
    if (dot - q > 1 && q[0] == '0') return 0;
    uint64_t M = 0;
    int nd = 0, lead = 0;
    for (const unsigned char *c = q; c < e; c++) {
        if (c == dot) continue;
        if (!is_digit(*c)) return 0;
        if (M == 0 && *c == '0') { lead += c > dot; continue; }
        if (++nd > 17) return 0;
        M = M * 10 + (uint64_t)(*c - '0');
    }
    int int_zero = dot - q == 1 && q[0] == '0';
    if (nd < 16 || (int_zero && lead > 3)) return 0;
    return dec_is_repr(M, (int)(e - dot - 1), fabs(d));
}

/* the float literal is how orjson writes its value: 1, else 0. Only literals without an
 * exponent: orjson and repr() differ there (0.00001 vs 1e-05) */
static int float_is_canonical(const unsigned char *p, Py_ssize_t n) {
    char tmp[64];
    if (n >= (Py_ssize_t)sizeof tmp || memchr(p, 'e', n) || memchr(p, 'E', n)) return 0;
    /* The common case without converting: at most 15 significant digits (DBL_DIG: the
     * literal is then the shortest string of its double), no superfluous trailing zero,
     * and 1e-4 <= |value| < 1e16 or 0 (repr() writes no exponent there). */
    {
        const unsigned char *q = p, *e = p + n;
        if (*q == '-') q++;
        const unsigned char *dot = memchr(q, '.', e - q);
        if (dot != NULL && dot + 1 < e) {
            Py_ssize_t nint = dot - q, nfrac = e - dot - 1;
            int int_zero = nint == 1 && q[0] == '0';
            Py_ssize_t lead = 0; /* zeros after the dot when the integer part is 0 */
            if (int_zero)
                while (lead < nfrac && dot[1 + lead] == '0') lead++;
            int dot0 = nfrac == 1 && dot[1] == '0'; /* X.0 */
            if (dot0 || e[-1] != '0') {
                Py_ssize_t sig = (int_zero ? 0 : nint) + (dot0 ? 0 : nfrac - lead);
                int zero = int_zero && dot0;
                if (sig <= 15 && (zero || !int_zero || lead <= 3)) return 1;
            }
        }
    }
    memcpy(tmp, p, n);
    tmp[n] = 0;
    char *end;
    double d = PyOS_string_to_double(tmp, &end, NULL);
    if (d == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    if (end != tmp + n) return 0;
    if (literal_is_repr(p, n, d)) return 1;
    char *r = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (r == NULL) { PyErr_Clear(); return 0; }
    int same = (Py_ssize_t)strlen(r) == n && memcmp(r, tmp, n) == 0;
    PyMem_Free(r);
    return same;
}

static inline int name_cmp(const jv_t *a, const jv_t *b) {
    Py_ssize_t n = a->n < b->n ? a->n : b->n;
    int c = memcmp(a->p, b->p, n);
    return c ? c : (a->n < b->n ? -1 : a->n > b->n);
}

/* copy the JSON value at s->p to `out` without whitespace, if that is what
 * orjson.dumps(orjson.loads(text), option=OPT_SORT_KEYS) gives -- and then also what
 * orjson.dumps(orjson.loads(text)) gives: object names strictly ascending (code point
 * order = UTF-8 byte order), numbers as orjson writes them. 1 copied, 0 not canonical
 * (use the reference), -1 error. Whitespace is allowed in the input: PostgreSQL writes
 * jsonb with a space after ':' and ','. */
static int canon_value(js_t *s, buf_t *out) {
    js_ws(s);
    if (s->p >= s->e) return 0;
    unsigned char c = *s->p;
    if (c == '{' || c == '[') {
        if (++s->depth > JS_MAX_DEPTH) return 0;
        int obj = c == '{';
        unsigned char close = obj ? '}' : ']';
        if (buf_put(out, s->p, 1) < 0) return -1;
        s->p++;
        js_ws(s);
        if (s->p < s->e && *s->p == close) {
            s->p++; s->depth--;
            return buf_put(out, &close, 1) < 0 ? -1 : 1;
        }
        jv_t prev = {NULL, 0, 0};
        for (int i = 0;; i++) {
            if (i && buf_put(out, ",", 1) < 0) return -1;
            if (obj) {
                jv_t name;
                if (s->p >= s->e || *s->p != '"' || js_string(s, &name) < 0) return 0;
                if (i && name_cmp(&prev, &name) >= 0) return 0;
                prev = name;
                if (buf_put(out, name.p - 1, name.n + 2) < 0 || buf_put(out, ":", 1) < 0)
                    return -1;
                js_ws(s);
                if (s->p >= s->e || *s->p != ':') return 0;
                s->p++;
            }
            int r = canon_value(s, out);
            if (r <= 0) return r;
            js_ws(s);
            if (s->p >= s->e) return 0;
            if (*s->p == ',') { s->p++; js_ws(s); continue; }
            if (*s->p != close) return 0;
            s->p++; s->depth--;
            return buf_put(out, &close, 1) < 0 ? -1 : 1;
        }
    }
    jv_t v;
    if (js_value(s, &v) < 0) return 0;
    if (v.type == J_INT && v.n == 2 && v.p[0] == '-' && v.p[1] == '0') return 0; /* -0 -> 0 */
    if (v.type == J_FLOAT && !float_is_canonical(v.p, v.n)) return 0;
    if (v.type == J_STR) return buf_put(out, v.p - 1, v.n + 2) < 0 ? -1 : 1; /* the quotes */
    return buf_put(out, v.p, v.n) < 0 ? -1 : 1;
}

/* the canonical text of the JSON `text` into `out` (appended): natively when it is
 * already canonical modulo whitespace, else through the reference helper. 0 ok, -1 error */
static int canon_json(const unsigned char *p, Py_ssize_t n, buf_t *out, PyObject **h,
                      int want_plain, buf_t *plain) {
    Py_ssize_t mark = out->len;
    js_t s = {p, p + n, 0};
    int r = canon_value(&s, out);
    if (r < 0) return -1;
    if (r == 1) {
        js_ws(&s);
        if (s.p == s.e) {
            if (want_plain && buf_put(plain, out->p + mark, out->len - mark) < 0) return -1;
            return 0;
        }
    }
    out->len = mark;
    PyObject *arg = PyBytes_FromStringAndSize((const char *)p, n);
    if (arg == NULL) return -1;
    PyObject *res = PyObject_CallOneArg(h[H_JSONB], arg);
    Py_DECREF(arg);
    if (res == NULL) return -1;
    int bad = !PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 ||
              !PyBytes_Check(PyTuple_GET_ITEM(res, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(res, 1));
    if (bad) {
        PyErr_SetString(PyExc_TypeError, "jsonb helper must return (bytes, bytes)");
    } else {
        PyObject *srt = PyTuple_GET_ITEM(res, 1), *pl = PyTuple_GET_ITEM(res, 0);
        bad = buf_put(out, PyBytes_AS_STRING(srt), PyBytes_GET_SIZE(srt)) < 0 ||
              (want_plain && buf_put(plain, PyBytes_AS_STRING(pl), PyBytes_GET_SIZE(pl)) < 0);
    }
    Py_DECREF(res);
    return bad ? -1 : 0;
}

/* -- raw_row ------------------------------------------------------------------------------ */

typedef struct { const char *p; Py_ssize_t n; } name_t;

/* a column's value, parsed */
typedef struct {
    int type;            /* J_*, 0 absent */
    const unsigned char *p;
    Py_ssize_t n;
    long long i;         /* J_INT; K_TS: micros */
    double d;            /* K_DOUBLE */
    tm_t t;              /* K_TS */
    Py_ssize_t jc, jcn;  /* K_JSONB: canonical text at scratch[jc:jc+jcn] */
    Py_ssize_t jp, jpn;  /*           plain text at scratch[jp:jp+jpn] */
} cv_t;

static int parse_int(const unsigned char *p, Py_ssize_t n, long long *out) {
    int neg = n > 0 && p[0] == '-';
    long long v = 0;
    for (Py_ssize_t i = neg; i < n; i++) v = v * 10 + (p[i] - '0'); /* <= 18 digits */
    *out = neg ? -v : v;
    return 0;
}

typedef struct {
    buf_t dg;       /* the digest text of one row */
    buf_t canon;    /* jsonb canonical texts of one row */
    buf_t plain;    /* jsonb plain texts of one row */
    cv_t *cv;       /* ncols */
    const name_t *names;
    const int *kinds;
    Py_ssize_t ncols;
    int raw;        /* the raw path is on (tests switch it off to compare) */
} raw_ctx;

/* parse the event into ctx->cv: 1 plain, 0 not plain, -1 error */
static int raw_parse(raw_ctx *c, const unsigned char *p, Py_ssize_t n, jv_t *version,
                     jv_t *ts, tm_t *ts_tm, PyObject **h) {
    js_t s = {p, p + n, 0};
    jv_t name, v, data = {NULL, 0, 0};
    version->type = ts->type = 0;
    js_ws(&s);
    int first = 1, r;
    while ((r = js_member(&s, &first, &name, &v)) == 1) {
        if (name.n == 4 && memcmp(name.p, "data", 4) == 0) data = v;
        else if (name.n == 7 && memcmp(name.p, "version", 7) == 0) *version = v;
        else if (name.n == 2 && memcmp(name.p, "ts", 2) == 0) *ts = v;
    }
    if (r < 0) return 0;
    js_ws(&s);
    if (s.p != s.e) return 0;
    if (version->type && version->type != J_NULL && version->type != J_INT) return 0;
    if (ts->type == J_STR) {
        if (!parse_ts_bytes((const char *)ts->p, ts->n, ts_tm)) return 0;
    } else if (ts->type && ts->type != J_NULL) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < c->ncols; i++) c->cv[i].type = 0;
    if (data.type && data.type != J_NULL) {
        if (data.type != J_OBJ) return 0;
        js_t d = {data.p, data.p + data.n, 0};
        Py_ssize_t next = 0;
        first = 1;
        while ((r = js_member(&d, &first, &name, &v)) == 1) {
            Py_ssize_t hit = -1;
            for (Py_ssize_t k = 0; k < c->ncols; k++) { /* names usually come in column order */
                Py_ssize_t j = next + k < c->ncols ? next + k : next + k - c->ncols;
                if (c->names[j].n == name.n && memcmp(c->names[j].p, name.p, name.n) == 0) {
                    hit = j;
                    break;
                }
            }
            if (hit < 0) continue;
            next = hit + 1 < c->ncols ? hit + 1 : 0;
            cv_t *x = &c->cv[hit];
            x->type = v.type; x->p = v.p; x->n = v.n;
        }
        if (r < 0) return 0;
    }
    c->canon.len = c->plain.len = 0;
    for (Py_ssize_t i = 0; i < c->ncols; i++) {
        cv_t *x = &c->cv[i];
        if (x->type == 0 || x->type == J_NULL) { x->type = 0; continue; }
        switch (c->kinds[i]) {
        case K_TEXT:
            if (x->type != J_STR) return 0;
            break;
        case K_TS:
            if (x->type != J_STR || !parse_ts_bytes((const char *)x->p, x->n, &x->t)) return 0;
            x->i = tm_micros(&x->t);
            break;
        case K_BIGINT:
            if (x->type != J_INT) return 0;
            parse_int(x->p, x->n, &x->i);
            break;
        case K_DOUBLE:
            if (x->type == J_INT) {
                parse_int(x->p, x->n, &x->i);
                x->d = (double)x->i;
            } else if (x->type == J_FLOAT) {
                char tmp[400];
                if (x->n >= (Py_ssize_t)sizeof tmp) return 0;
                memcpy(tmp, x->p, x->n);
                tmp[x->n] = 0;
                x->d = PyOS_string_to_double(tmp, NULL, NULL);
                if (x->d == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
            } else {
                return 0;
            }
            break;
        case K_BOOL:
            if (x->type != J_TRUE && x->type != J_FALSE) return 0;
            break;
        case K_JSONB:
            x->jc = c->canon.len;
            x->jp = c->plain.len;
            if (canon_json(x->type == J_STR ? x->p - 1 : x->p, /* with its quotes */
                           x->type == J_STR ? x->n + 2 : x->n, &c->canon, h, 1, &c->plain) < 0)
                return -1;
            x->jcn = c->canon.len - x->jc;
            x->jpn = c->plain.len - x->jp;
            break;
        }
    }
    return 1;
}

/* the digest text of the parsed row into c->dg (hashed by the caller) */
static int raw_digest_text(raw_ctx *c, const char *key, Py_ssize_t keyn, PyObject **h) {
    buf_t *b = &c->dg;
    b->len = 0;
    if (buf_put(b, "[", 1) < 0 || dj_str(b, (const unsigned char *)key, keyn) < 0) return -1;
    for (Py_ssize_t i = 0; i < c->ncols; i++) {
        cv_t *x = &c->cv[i];
        if (buf_put(b, ",", 1) < 0) return -1;
        int bad = 0;
        if (x->type == 0) { bad = buf_put(b, "null", 4); }
        else switch (c->kinds[i]) {
        case K_TEXT: bad = buf_reserve(b, x->n + 2) < 0; /* plain: no escaping needed */
            if (!bad) { b->p[b->len++] = '"'; memcpy(b->p + b->len, x->p, x->n);
                        b->len += x->n; b->p[b->len++] = '"'; }
            break;
        case K_TS: case K_BIGINT: bad = dj_int(b, x->i); break;
        case K_DOUBLE: bad = dj_double(b, x->d, h); break;
        case K_BOOL: bad = x->type == J_TRUE ? buf_put(b, "true", 4) : buf_put(b, "false", 5);
            break;
        case K_JSONB:
            bad = dj_str(b, (const unsigned char *)c->canon.p + x->jc, x->jcn);
            break;
        }
        if (bad < 0) return -1;
    }
    return buf_put(b, "]", 1) < 0 ? -1 : 0;
}

/* the digest text of the parsed row and its hash added to *acc */
static int raw_digest(raw_ctx *c, const char *key, Py_ssize_t keyn, PyObject **h, u128 *acc) {
    if (raw_digest_text(c, key, keyn, h) < 0) return -1;
    *acc += blake2b_128((const uint8_t *)c->dg.p, (size_t)c->dg.len);
    return 0;
}

static inline void put_null(buf_t *b) { put_be(b, 0xFFFFFFFFu, 4); }

/* the parsed row as one PostgreSQL binary COPY row */
static int raw_put_pg(raw_ctx *c, buf_t *out, const char *key, Py_ssize_t keyn,
                      const jv_t *version, const jv_t *ts, const tm_t *ts_tm,
                      const char *topic, Py_ssize_t topicn, long long partition,
                      long long offset) {
    if (buf_reserve(out, 2) < 0) return -1;
    put_be(out, (uint64_t)(c->ncols + 6), 2);
    if (put_bytes(out, key, keyn, 0) < 0) return -1;
    for (Py_ssize_t i = 0; i < c->ncols; i++) {
        cv_t *x = &c->cv[i];
        if (buf_reserve(out, 13) < 0) return -1;
        if (x->type == 0) { put_null(out); continue; }
        switch (c->kinds[i]) {
        case K_TEXT:
            if (put_bytes(out, (const char *)x->p, x->n, 0) < 0) return -1;
            break;
        case K_TS:
            put_be(out, 8, 4);
            put_be(out, (uint64_t)(x->i - PG_EPOCH_US), 8);
            break;
        case K_BIGINT:
            put_be(out, 8, 4);
            put_be(out, (uint64_t)x->i, 8);
            break;
        case K_DOUBLE: {
            uint64_t bits;
            memcpy(&bits, &x->d, 8);
            put_be(out, 8, 4);
            put_be(out, bits, 8);
            break;
        }
        case K_BOOL:
            put_be(out, 1, 4);
            out->p[out->len++] = x->type == J_TRUE;
            break;
        case K_JSONB:
            if (put_bytes(out, c->plain.p + x->jp, x->jpn, 1) < 0) return -1;
            break;
        }
    }
    if (buf_reserve(out, 13) < 0) return -1;
    if (version->type == J_INT) {
        long long v;
        parse_int(version->p, version->n, &v);
        put_be(out, 8, 4);
        put_be(out, (uint64_t)v, 8);
    } else {
        put_null(out);
    }
    if (put_bytes(out, topic, topicn, 0) < 0 || buf_reserve(out, 36) < 0) return -1;
    put_be(out, 8, 4);
    put_be(out, (uint64_t)partition, 8);
    put_be(out, 8, 4);
    put_be(out, (uint64_t)offset, 8);
    if (ts->type == J_STR) {
        put_be(out, 8, 4);
        put_be(out, (uint64_t)(tm_micros(ts_tm) - PG_EPOCH_US), 8);
    } else {
        put_null(out);
    }
    return 0;
}

/* the parsed row as a tuple of the target's Python values (T_PG or T_SQLITE) */
static PyObject *raw_tuple(raw_ctx *c, int target, PyObject *key, const jv_t *version,
                           const jv_t *ts, const tm_t *ts_tm, PyObject *topic,
                           PyObject *partition, PyObject *offset, PyObject **h) {
    PyObject *row = PyTuple_New(c->ncols + 6);
    if (row == NULL) return NULL;
    PyTuple_SET_ITEM(row, 0, Py_NewRef(key));
    for (Py_ssize_t i = 0; i < c->ncols; i++) {
        cv_t *x = &c->cv[i];
        PyObject *v = NULL;
        if (x->type == 0) v = Py_NewRef(Py_None);
        else switch (c->kinds[i]) {
        case K_TEXT: v = PyUnicode_DecodeUTF8((const char *)x->p, x->n, NULL); break;
        case K_TS: v = target == T_PG ? tm_datetime(&x->t, h[H_UTC]) : tm_text(&x->t); break;
        case K_BIGINT: v = PyLong_FromLongLong(x->i); break;
        case K_DOUBLE: v = PyFloat_FromDouble(x->d); break;
        case K_BOOL:
            v = target == T_PG ? Py_NewRef(x->type == J_TRUE ? Py_True : Py_False)
                               : PyLong_FromLong(x->type == J_TRUE);
            break;
        case K_JSONB:
            v = target == T_PG ? PyUnicode_DecodeUTF8(c->plain.p + x->jp, x->jpn, NULL)
                               : PyUnicode_DecodeUTF8(c->canon.p + x->jc, x->jcn, NULL);
            break;
        }
        if (v == NULL) { Py_DECREF(row); return NULL; }
        PyTuple_SET_ITEM(row, i + 1, v);
    }
    PyObject *ver, *tsv;
    if (version->type == J_INT) {
        long long v;
        parse_int(version->p, version->n, &v);
        ver = PyLong_FromLongLong(v);
    } else {
        ver = Py_NewRef(Py_None);
    }
    if (ts->type == J_STR) tsv = target == T_PG ? tm_datetime(ts_tm, h[H_UTC]) : tm_text(ts_tm);
    else tsv = Py_NewRef(Py_None);
    if (ver == NULL || tsv == NULL) {
        Py_XDECREF(ver); Py_XDECREF(tsv); Py_DECREF(row);
        return NULL;
    }
    PyTuple_SET_ITEM(row, c->ncols + 1, ver);
    PyTuple_SET_ITEM(row, c->ncols + 2, Py_NewRef(topic));
    PyTuple_SET_ITEM(row, c->ncols + 3, Py_NewRef(partition));
    PyTuple_SET_ITEM(row, c->ncols + 4, Py_NewRef(offset));
    PyTuple_SET_ITEM(row, c->ncols + 5, tsv);
    return row;
}

/* one live change the raw way: 1 done (row written or appended, digest added), 0 not
 * plain (nothing written), -1 error */
static int raw_row(raw_ctx *c, PyObject *key, PyObject *value, PyObject *topic,
                   PyObject *partition, PyObject *offset, int target, int binary,
                   PyObject **h, buf_t *out, PyObject *rows, u128 *acc) {
    if (!c->raw || !PyBytes_CheckExact(value) || !PyUnicode_CheckExact(key)) return 0;
    jv_t version, ts;
    tm_t ts_tm;
    int r = raw_parse(c, (const unsigned char *)PyBytes_AS_STRING(value),
                      PyBytes_GET_SIZE(value), &version, &ts, &ts_tm, h);
    if (r <= 0) return r;
    Py_ssize_t keyn;
    const char *k = PyUnicode_AsUTF8AndSize(key, &keyn);
    if (k == NULL) { PyErr_Clear(); return 0; }
    if (binary) {
        Py_ssize_t topicn;
        const char *t = PyUnicode_AsUTF8AndSize(topic, &topicn);
        if (t == NULL) { PyErr_Clear(); return 0; }
        long long part = PyLong_AsLongLong(partition), off = PyLong_AsLongLong(offset);
        if (PyErr_Occurred()) { PyErr_Clear(); return 0; }
        Py_ssize_t mark = out->len;
        if (raw_put_pg(c, out, k, keyn, &version, &ts, &ts_tm, t, topicn, part, off) < 0 ||
            raw_digest(c, k, keyn, h, acc) < 0) {
            out->len = mark;
            return -1;
        }
        return 1;
    }
    PyObject *row = raw_tuple(c, target, key, &version, &ts, &ts_tm, topic, partition,
                              offset, h);
    if (row == NULL) return -1;
    u128 a = *acc;
    int bad = raw_digest(c, k, keyn, h, &a) < 0 || PyList_Append(rows, row) < 0;
    Py_DECREF(row);
    if (bad) return -1;
    *acc = a;
    return 1;
}

static int raw_enabled = 1;

/* tests: literal_is_repr's verdict on a literal (bytes) */
static PyObject *py_literal_is_repr(PyObject *Py_UNUSED(self), PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "literal_is_repr takes bytes");
        return NULL;
    }
    char *end;
    double d = PyOS_string_to_double(PyBytes_AS_STRING(arg), &end, NULL);
    if (d == -1.0 && PyErr_Occurred()) return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    return PyBool_FromLong(literal_is_repr(p, PyBytes_GET_SIZE(arg), d));
}

static PyObject *py_set_raw(PyObject *Py_UNUSED(self), PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    int was = raw_enabled;
    raw_enabled = on;
    return PyBool_FromLong(was);
}

static int raw_ctx_init(raw_ctx *c, PyObject *names, const int *kinds, Py_ssize_t ncols) {
    memset(c, 0, sizeof *c);
    c->raw = raw_enabled;
    c->kinds = kinds;
    c->ncols = ncols;
    name_t *nm = PyMem_Calloc(ncols ? ncols : 1, sizeof(name_t));
    c->cv = PyMem_Calloc(ncols ? ncols : 1, sizeof(cv_t));
    if (nm == NULL || c->cv == NULL) {
        PyMem_Free(nm);
        PyMem_Free(c->cv);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < ncols; i++) {
        nm[i].p = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(names, i), &nm[i].n);
        if (nm[i].p == NULL) { PyMem_Free(nm); PyMem_Free(c->cv); return -1; }
    }
    c->names = nm;
    return 0;
}

static void raw_ctx_free(raw_ctx *c) {
    PyMem_Free((void *)c->names);
    PyMem_Free(c->cv);
    PyMem_Free(c->dg.p);
    PyMem_Free(c->canon.p);
    PyMem_Free(c->plain.p);
}

/* -- sort_changes: the live state in key order ------------------------------------------ */

typedef struct {
    char pre[16];        /* the key's first 16 UTF-8 bytes, zero-padded */
    const char *p;       /* the whole key's UTF-8 (held by the str) */
    Py_ssize_t len;
    PyObject *key, *change;
} sitem_t;

/* UTF-8 byte order = code point order = the order of sorted() on str */
static int sitem_cmp(const void *a, const void *b) {
    const sitem_t *x = a, *y = b;
    int c = memcmp(x->pre, y->pre, 16);
    if (c) return c;
    Py_ssize_t n = x->len < y->len ? x->len : y->len;
    if (n > 16 && (c = memcmp(x->p + 16, y->p + 16, n - 16)) != 0) return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* sort_changes(changes) -> (keys, changes in the same order) or None (a key that is not a
 * str, or not encodable: the caller sorts in Python). Reads the dict in its own order
 * (the order its objects were made in: sequential memory) and sorts 40-byte records by
 * their inline key prefix, instead of sorted() following pointers to every str and a dict
 * lookup per key afterwards. Every key and change is referenced while the GIL is let go
 * for the sort (a key's UTF-8 lives as long as the key), and the references are handed to
 * the result lists. */
static void sitems_release(sitem_t *a, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(a[i].key);
        Py_DECREF(a[i].change);
    }
    PyMem_RawFree(a);
}

static PyObject *sort_changes(PyObject *Py_UNUSED(self), PyObject *changes) {
    if (!PyDict_Check(changes)) {
        PyErr_SetString(PyExc_TypeError, "sort_changes: a dict");
        return NULL;
    }
    Py_ssize_t n = PyDict_GET_SIZE(changes), i = 0, pos = 0;
    sitem_t *a = PyMem_RawMalloc(sizeof(sitem_t) * (n ? n : 1));
    if (a == NULL) return PyErr_NoMemory();
    PyObject *key, *change;
    while (PyDict_Next(changes, &pos, &key, &change)) {
        if (i >= n || !PyUnicode_CheckExact(key)) { sitems_release(a, i); Py_RETURN_NONE; }
        Py_ssize_t len;
        const char *u = PyUnicode_AsUTF8AndSize(key, &len);
        if (u == NULL) { PyErr_Clear(); sitems_release(a, i); Py_RETURN_NONE; }
        sitem_t *it = &a[i++];
        it->p = u;
        it->len = len;
        memset(it->pre, 0, 16);
        memcpy(it->pre, u, len < 16 ? len : 16);
        it->key = Py_NewRef(key);
        it->change = Py_NewRef(change);
    }
    if (i != n) { sitems_release(a, i); Py_RETURN_NONE; }
    Py_BEGIN_ALLOW_THREADS /* only our own references are read meanwhile */
    qsort(a, (size_t)n, sizeof(sitem_t), sitem_cmp);
    Py_END_ALLOW_THREADS
    PyObject *keys = PyList_New(n), *vals = PyList_New(n);
    if (keys == NULL || vals == NULL) {
        Py_XDECREF(keys);
        Py_XDECREF(vals);
        sitems_release(a, n);
        return NULL;
    }
    for (i = 0; i < n; i++) { /* the lists take over the references */
        PyList_SET_ITEM(keys, i, a[i].key);
        PyList_SET_ITEM(vals, i, a[i].change);
    }
    PyMem_RawFree(a);
    PyObject *res = PyTuple_Pack(2, keys, vals);
    Py_DECREF(keys);
    Py_DECREF(vals);
    return res;
}

/* the fields of the change at values[i] that its row needs (borrowed), with the changes a
 * few rows ahead prefetched (they sit in memory in replay order, not key order: each
 * event's first bytes AHEAD rows on, its tuple twice as far): 1 a live change, 0 a
 * tombstone, -1 error (`fn` names the caller in the message) */
static int change_fields(PyObject *values, Py_ssize_t i, PyObject *parts, const char *fn,
                         PyObject **value, PyObject **topic, PyObject **partition,
                         PyObject **offset) {
    enum { AHEAD = 4 };
    Py_ssize_t n = PyList_GET_SIZE(values);
    if (i + 2 * AHEAD < n) __builtin_prefetch(PyList_GET_ITEM(values, i + 2 * AHEAD));
    if (i + AHEAD < n) {
        PyObject *ahead = PyList_GET_ITEM(values, i + AHEAD);
        if (PyTuple_Check(ahead) && PyTuple_GET_SIZE(ahead) >= 5 &&
            PyBytes_CheckExact(PyTuple_GET_ITEM(ahead, 4))) {
            const char *d = PyBytes_AS_STRING(PyTuple_GET_ITEM(ahead, 4));
            __builtin_prefetch(d);
            __builtin_prefetch(d + 64);
            __builtin_prefetch(d + 128);
            __builtin_prefetch(d + 192);
        }
    }
    PyObject *ch = PyList_GET_ITEM(values, i);
    if (!PyTuple_Check(ch) || PyTuple_GET_SIZE(ch) < 5) {
        PyErr_Format(PyExc_TypeError, "%s: a change is a tuple", fn);
        return -1;
    }
    *value = PyTuple_GET_ITEM(ch, 4);
    if (*value == Py_None) return 0;
    Py_ssize_t rank = PyLong_AsSsize_t(PyTuple_GET_ITEM(ch, 2));
    if (rank < 0 || rank >= PyList_GET_SIZE(parts)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_IndexError, "%s: rank", fn);
        return -1;
    }
    PyObject *part = PyList_GET_ITEM(parts, rank); /* (topic, partition) */
    *topic = PyTuple_GET_ITEM(part, 0);
    *partition = PyTuple_GET_ITEM(part, 1);
    *offset = PyTuple_GET_ITEM(ch, 3);
    return 1;
}

/* the row and canonical tuple of an event the raw path did not take: the orjson path,
 * else the Python reference (slow_row); new references; 0 ok, -1 error */
static int object_row(PyObject *key, PyObject *value, PyObject *topic, PyObject *partition,
                      PyObject *offset, PyObject *names, const int *kinds, Py_ssize_t ncols,
                      int target, PyObject **h, PyObject **row, PyObject **canon) {
    int r = fast_row(key, value, topic, partition, offset, names, kinds, ncols, target, h, row,
                     canon);
    if (r != 0) return r < 0 ? -1 : 0;
    PyObject *res = PyObject_CallFunctionObjArgs(h[H_SLOW_ROW], key, value, topic, partition,
                                                 offset, NULL);
    if (res == NULL) return -1;
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(res, 0)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(res, 0)) != ncols + 6) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "slow_row must return (row, canonical)");
        return -1;
    }
    *row = Py_NewRef(PyTuple_GET_ITEM(res, 0));
    *canon = Py_NewRef(PyTuple_GET_ITEM(res, 1));
    Py_DECREF(res);
    return 0;
}

static int parse_kinds(PyObject *kinds_t, int *kinds, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        long k = PyLong_AsLong(PyTuple_GET_ITEM(kinds_t, i));
        if (k < K_TEXT || k > K_JSONB) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "unknown column kind");
            return -1;
        }
        kinds[i] = (int)k;
    }
    return 0;
}

static PyObject *encode_chunk(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *names, *kinds_t, *keys, *values, *parts, *helpers;
    int target;
    if (!PyArg_ParseTuple(args, "O!O!iO!O!O!O!", &PyTuple_Type, &names, &PyTuple_Type,
                          &kinds_t, &target, &PyList_Type, &keys, &PyList_Type, &values,
                          &PyList_Type, &parts, &PyTuple_Type, &helpers))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(names);
    if (PyList_GET_SIZE(values) != PyList_GET_SIZE(keys)) {
        PyErr_SetString(PyExc_ValueError, "encode_chunk: one change per key");
        return NULL;
    }
    if (PyTuple_GET_SIZE(kinds_t) != ncols || PyTuple_GET_SIZE(helpers) != H_COUNT) {
        PyErr_SetString(PyExc_ValueError, "encode_chunk: bad spec");
        return NULL;
    }
    int *kinds = PyMem_Malloc(sizeof(int) * (ncols ? ncols : 1));
    if (kinds == NULL) return PyErr_NoMemory();
    PyObject **h = &PyTuple_GET_ITEM(helpers, 0);
    PyObject *rows = NULL;
    u128 acc = 0;
    int binary = target == T_PGBIN;
    buf_t out = {NULL, 0, 0};
    Py_ssize_t count = 0;
    if (binary) target = T_PG;
    raw_ctx rc;
    int rc_ok = 0;
    if (parse_kinds(kinds_t, kinds, ncols) < 0) goto fail;
    if (raw_ctx_init(&rc, names, kinds, ncols) < 0) goto fail;
    rc_ok = 1;
    rows = PyList_New(0);
    if (rows == NULL) goto fail;
    Py_ssize_t nkeys = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *value, *topic, *partition, *offset;
        int live = change_fields(values, i, parts, "encode_chunk", &value, &topic, &partition,
                                 &offset);
        if (live < 0) goto fail;
        if (live == 0) continue; /* a tombstone */
        int rr = raw_row(&rc, key, value, topic, partition, offset, target, binary, h, &out,
                         rows, &acc);
        if (rr < 0) goto fail;
        if (rr == 1) { count++; continue; }
        PyObject *row, *canon;
        if (object_row(key, value, topic, partition, offset, names, kinds, ncols, target, h,
                       &row, &canon) < 0)
            goto fail;
        int bad = digest_add(canon, h, &acc) < 0 ||
                  (binary ? put_row(&out, row, kinds, ncols, h) : PyList_Append(rows, row)) < 0;
        Py_DECREF(row);
        Py_DECREF(canon);
        if (bad) goto fail;
        count++;
    }
    PyMem_Free(kinds);
    raw_ctx_free(&rc);
    if (binary) {
        Py_DECREF(rows);
        rows = PyBytes_FromStringAndSize(out.p ? out.p : "", out.len);
        PyMem_Free(out.p);
        if (rows == NULL) return NULL;
    }
    PyObject *res = sum_result(count, acc, rows);
    Py_DECREF(rows);
    return res;
fail:
    PyMem_Free(kinds);
    if (rc_ok) raw_ctx_free(&rc);
    PyMem_Free(out.p);
    Py_XDECREF(rows);
    return NULL;
}

/* -- digest_rows -------------------------------------------------------------------- */

/* the canonical form of one stored value (new reference) */
static PyObject *stored_canon(int kind, int target, PyObject *v, PyObject **h) {
    if (v == Py_None) return Py_NewRef(Py_None);
    switch (kind) {
    case K_TEXT:
        return Py_NewRef(v);
    case K_TS:
        if (target == T_PG && PyDateTime_CheckExact(v) &&
            PyDateTime_DATE_GET_TZINFO(v) == h[H_UTC]) {
            tm_t t = {PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v),
                      PyDateTime_DATE_GET_HOUR(v), PyDateTime_DATE_GET_MINUTE(v),
                      PyDateTime_DATE_GET_SECOND(v), PyDateTime_DATE_GET_MICROSECOND(v)};
            return PyLong_FromLongLong(tm_micros(&t));
        }
        if (target == T_SQLITE && PyUnicode_CheckExact(v)) {
            tm_t t;
            if (parse_ts(v, &t)) return PyLong_FromLongLong(tm_micros(&t));
        }
        break;
    case K_BIGINT:
        if (PyLong_CheckExact(v)) return Py_NewRef(v);
        break;
    case K_DOUBLE:
        if (PyFloat_CheckExact(v)) return Py_NewRef(v);
        break;
    case K_BOOL:
        if (PyBool_Check(v)) return Py_NewRef(v);
        if (PyLong_CheckExact(v)) {
            int t = PyObject_IsTrue(v);
            return t < 0 ? NULL : Py_NewRef(t ? Py_True : Py_False);
        }
        break;
    case K_JSONB:
        if (PyUnicode_CheckExact(v)) { /* canonical_json(orjson.loads(v)) */
            PyObject *obj = PyObject_CallOneArg(h[H_LOADS], v);
            if (obj == NULL) return NULL;
            PyObject *sorted = PyObject_VectorcallDict(h[H_DUMPS], &obj, 1, h[H_SORTKW]);
            Py_DECREF(obj);
            if (sorted == NULL) return NULL;
            PyObject *text = PyUnicode_FromEncodedObject(sorted, "utf-8", "strict");
            Py_DECREF(sorted);
            return text;
        }
        break;
    }
    PyObject *k = PyLong_FromLong(kind);
    if (k == NULL) return NULL;
    PyObject *r = PyObject_CallFunctionObjArgs(h[H_STORED], k, v, NULL);
    Py_DECREF(k);
    return r;
}

/* the digest text of one row read back as Python values (key, data columns), built
 * natively for the exact types the targets give: 1 added to *acc, 0 use the reference
 * converters, -1 error */
static int stored_row_digest(const int *kinds, Py_ssize_t ncols, int target, PyObject *row,
                             buf_t *dg, buf_t *scratch, PyObject **h, u128 *acc) {
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != ncols + 1) return 0;
    dg->len = 0;
    if (buf_put(dg, "[", 1) < 0) return -1;
    for (Py_ssize_t i = 0; i <= ncols; i++) {
        PyObject *v = PyTuple_GET_ITEM(row, i);
        if (i && buf_put(dg, ",", 1) < 0) return -1;
        int kind = i == 0 ? K_TEXT : kinds[i - 1];
        int bad = 0;
        if (v == Py_None && i) {
            bad = buf_put(dg, "null", 4) < 0;
        } else if (kind == K_TEXT || kind == K_JSONB || (kind == K_TS && target == T_SQLITE)) {
            if (!PyUnicode_CheckExact(v)) return 0;
            Py_ssize_t n;
            const char *u = PyUnicode_AsUTF8AndSize(v, &n);
            if (u == NULL) { PyErr_Clear(); return 0; }
            if (kind == K_TEXT) {
                bad = dj_str(dg, (const unsigned char *)u, n) < 0;
            } else if (kind == K_TS) {
                tm_t t;
                if (!parse_ts_bytes(u, n, &t)) return 0;
                bad = dj_int(dg, tm_micros(&t)) < 0;
            } else {
                scratch->len = 0;
                bad = canon_json((const unsigned char *)u, n, scratch, h, 0, NULL) < 0 ||
                      dj_str(dg, (const unsigned char *)scratch->p, scratch->len) < 0;
            }
        } else if (kind == K_TS) {
            if (!PyDateTime_CheckExact(v) || PyDateTime_DATE_GET_TZINFO(v) != h[H_UTC]) return 0;
            tm_t t = {PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v),
                      PyDateTime_DATE_GET_HOUR(v), PyDateTime_DATE_GET_MINUTE(v),
                      PyDateTime_DATE_GET_SECOND(v), PyDateTime_DATE_GET_MICROSECOND(v)};
            bad = dj_int(dg, tm_micros(&t)) < 0;
        } else if (kind == K_BIGINT) {
            if (!PyLong_CheckExact(v)) return 0;
            int overflow;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow || (x == -1 && PyErr_Occurred())) { PyErr_Clear(); return 0; }
            bad = dj_int(dg, x) < 0;
        } else if (kind == K_DOUBLE) {
            if (!PyFloat_CheckExact(v) || !isfinite(PyFloat_AS_DOUBLE(v))) return 0;
            bad = dj_double(dg, PyFloat_AS_DOUBLE(v), h) < 0;
        } else if (kind == K_BOOL) {
            int t;
            if (PyBool_Check(v)) t = v == Py_True;
            else if (PyLong_CheckExact(v)) t = PyObject_IsTrue(v);
            else return 0;
            bad = t ? buf_put(dg, "true", 4) < 0 : buf_put(dg, "false", 5) < 0;
        } else {
            return 0;
        }
        if (bad) return -1;
    }
    if (buf_put(dg, "]", 1) < 0) return -1;
    *acc += blake2b_128((const uint8_t *)dg->p, (size_t)dg->len);
    return 1;
}

/* one row read back as a Python sequence (key, data columns) added to *acc: natively,
 * else through the reference converters; 0 ok, -1 error */
static int py_row_digest(const int *kinds, Py_ssize_t ncols, int target, PyObject *row,
                         buf_t *dg, buf_t *scratch, PyObject **h, u128 *acc) {
    int nr = stored_row_digest(kinds, ncols, target, row, dg, scratch, h, acc);
    if (nr != 0) return nr < 0 ? -1 : 0;
    PyObject *canon = PyTuple_New(ncols + 1);
    int bad = canon == NULL;
    for (Py_ssize_t i = 0; !bad && i <= ncols; i++) {
        PyObject *v = PySequence_GetItem(row, i);
        if (v == NULL) { bad = 1; break; }
        PyObject *c = i == 0 ? Py_NewRef(v) : stored_canon(kinds[i - 1], target, v, h);
        Py_DECREF(v);
        if (c == NULL) { bad = 1; break; }
        PyTuple_SET_ITEM(canon, i, c);
    }
    if (!bad) bad = digest_add(canon, h, acc) < 0;
    Py_XDECREF(canon);
    return bad ? -1 : 0;
}

static PyObject *digest_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *kinds_t, *rows, *helpers;
    int target;
    if (!PyArg_ParseTuple(args, "O!iOO!", &PyTuple_Type, &kinds_t, &target, &rows,
                          &PyTuple_Type, &helpers))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(kinds_t);
    if (PyTuple_GET_SIZE(helpers) != H_COUNT) {
        PyErr_SetString(PyExc_ValueError, "digest_rows: bad helpers");
        return NULL;
    }
    int *kinds = PyMem_Malloc(sizeof(int) * (ncols ? ncols : 1));
    if (kinds == NULL) return PyErr_NoMemory();
    PyObject **h = &PyTuple_GET_ITEM(helpers, 0);
    u128 acc = 0;
    Py_ssize_t count = 0;
    PyObject *it = NULL;
    buf_t dg = {NULL, 0, 0}, scratch = {NULL, 0, 0};
    if (parse_kinds(kinds_t, kinds, ncols) < 0) goto fail;
    it = PyObject_GetIter(rows);
    if (it == NULL) goto fail;
    PyObject *row;
    while ((row = PyIter_Next(it)) != NULL) {
        int bad = py_row_digest(kinds, ncols, target, row, &dg, &scratch, h, &acc) < 0;
        Py_DECREF(row);
        if (bad) goto fail;
        count++;
    }
    if (PyErr_Occurred()) goto fail;
    Py_DECREF(it);
    PyMem_Free(kinds);
    PyMem_Free(dg.p);
    PyMem_Free(scratch.p);
    return sum_result(count, acc, NULL);
fail:
    Py_XDECREF(it);
    PyMem_Free(kinds);
    PyMem_Free(dg.p);
    PyMem_Free(scratch.p);
    return NULL;
}

/* -- digest_copy: PostgreSQL binary COPY data read back -> digest ---------------------- */

static inline uint64_t get_be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* the canonical form of one binary field of `kind` (new reference) */
static PyObject *binary_canon(int kind, const unsigned char *p, int32_t n, PyObject **h) {
    switch (kind) {
    case K_TEXT:
        return PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    case K_TS:
        if (n != 8) break;
        return PyLong_FromLongLong((long long)get_be(p, 8) + PG_EPOCH_US);
    case K_BIGINT:
        if (n != 8) break;
        return PyLong_FromLongLong((long long)get_be(p, 8));
    case K_DOUBLE: {
        if (n != 8) break;
        uint64_t bits = get_be(p, 8);
        double d;
        memcpy(&d, &bits, 8);
        return PyFloat_FromDouble(d);
    }
    case K_BOOL:
        if (n != 1) break;
        return Py_NewRef(p[0] ? Py_True : Py_False);
    case K_JSONB: {
        if (n < 1 || p[0] != 1) break;
        PyObject *text = PyUnicode_DecodeUTF8((const char *)p + 1, n - 1, NULL);
        if (text == NULL) return NULL;
        PyObject *c = stored_canon(K_JSONB, T_PG, text, h);
        Py_DECREF(text);
        return c;
    }
    }
    PyErr_Format(PyExc_ValueError, "binary COPY: unexpected field of %d bytes for kind %d", n,
                 kind);
    return NULL;
}

/* the digest text of one binary COPY row (key, data columns) read back, built natively:
 * 1 added to *acc, 0 use the Python path (text that is not valid UTF-8, a field of an
 * unexpected size), -1 error */
static int copy_row_digest(const int *kinds, int nf, const unsigned char *q, buf_t *dg,
                           buf_t *scratch, PyObject **h, u128 *acc) {
    dg->len = 0;
    if (buf_put(dg, "[", 1) < 0) return -1;
    for (int i = 0; i < nf; i++) {
        int32_t n = (int32_t)get_be(q, 4);
        q += 4;
        if (i && buf_put(dg, ",", 1) < 0) return -1;
        if (n < 0) {
            if (buf_put(dg, "null", 4) < 0) return -1;
            continue;
        }
        int kind = i == 0 ? K_TEXT : kinds[i - 1];
        int bad = 0;
        switch (kind) {
        case K_TEXT: {
            /* valid UTF-8 without control characters, '"' or '\\': as it is */
            const unsigned char *e = q + n;
            int plain = 1;
            for (const unsigned char *p = q; p < e; p++)
                if (*p < 0x20 || *p == '"' || *p == '\\') { plain = 0; break; }
            if (!utf8_valid(q, n)) return 0;
            if (plain) {
                bad = buf_reserve(dg, n + 2) < 0;
                if (!bad) {
                    dg->p[dg->len++] = '"';
                    memcpy(dg->p + dg->len, q, n);
                    dg->len += n;
                    dg->p[dg->len++] = '"';
                }
            } else {
                bad = dj_str(dg, q, n) < 0;
            }
            break;
        }
        case K_TS: {
            if (n != 8) return 0;
            long long us = (long long)get_be(q, 8);
            if (us > LLONG_MAX - PG_EPOCH_US) return 0; /* 'infinity': the Python path */
            bad = dj_int(dg, us + PG_EPOCH_US) < 0;
            break;
        }
        case K_BIGINT:
            if (n != 8) return 0;
            bad = dj_int(dg, (long long)get_be(q, 8)) < 0;
            break;
        case K_DOUBLE: {
            if (n != 8) return 0;
            uint64_t bits = get_be(q, 8);
            double d;
            memcpy(&d, &bits, 8);
            if (!isfinite(d)) return 0;
            bad = dj_double(dg, d, h) < 0;
            break;
        }
        case K_BOOL:
            if (n != 1) return 0;
            bad = q[0] ? buf_put(dg, "true", 4) < 0 : buf_put(dg, "false", 5) < 0;
            break;
        case K_JSONB:
            if (n < 1 || q[0] != 1 || !utf8_valid(q + 1, n - 1)) return 0;
            scratch->len = 0;
            bad = canon_json(q + 1, n - 1, scratch, h, 0, NULL) < 0 ||
                  dj_str(dg, (const unsigned char *)scratch->p, scratch->len) < 0;
            break;
        default:
            return 0;
        }
        if (bad) return -1;
        q += n;
    }
    if (buf_put(dg, "]", 1) < 0) return -1;
    *acc += blake2b_128((const uint8_t *)dg->p, (size_t)dg->len);
    return 1;
}

/* digest_copy(kinds, data, helpers) -> (consumed, count, hi, lo, done): digests the whole
 * rows (key, data columns) at the start of `data` (the header already skipped); `done`
 * when the trailer was reached */
static PyObject *digest_copy(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *kinds_t, *helpers;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "O!y*O!", &PyTuple_Type, &kinds_t, &buf, &PyTuple_Type,
                          &helpers))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(kinds_t);
    PyObject *result = NULL;
    int *kinds = PyMem_Malloc(sizeof(int) * (ncols ? ncols : 1));
    if (kinds == NULL) { PyBuffer_Release(&buf); return PyErr_NoMemory(); }
    PyObject **h = &PyTuple_GET_ITEM(helpers, 0);
    const unsigned char *d = buf.buf;
    Py_ssize_t size = buf.len, pos = 0, count = 0;
    u128 acc = 0;
    int done = 0;
    buf_t dg = {NULL, 0, 0}, scratch = {NULL, 0, 0};
    if (PyTuple_GET_SIZE(helpers) != H_COUNT || parse_kinds(kinds_t, kinds, ncols) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "digest_copy: bad helpers");
        goto out;
    }
    while (size - pos >= 2) {
        int16_t nf = (int16_t)get_be(d + pos, 2);
        if (nf == -1) { done = 1; pos += 2; break; }
        if (nf != ncols + 1) {
            PyErr_Format(PyExc_ValueError, "binary COPY: a row of %d fields, expected %zd",
                         nf, ncols + 1);
            goto out;
        }
        /* is the whole row here? */
        Py_ssize_t q = pos + 2;
        int whole = 1;
        for (int i = 0; i < nf; i++) {
            if (size - q < 4) { whole = 0; break; }
            int32_t n = (int32_t)get_be(d + q, 4);
            q += 4;
            if (n > 0) {
                if (size - q < n) { whole = 0; break; }
                q += n;
            }
        }
        if (!whole) break;
        int nr = copy_row_digest(kinds, nf, d + pos + 2, &dg, &scratch, h, &acc);
        if (nr < 0) goto out;
        if (nr == 1) { count++; pos = q; continue; }
        PyObject *canon = PyTuple_New(nf);
        if (canon == NULL) goto out;
        q = pos + 2;
        for (int i = 0; i < nf; i++) {
            int32_t n = (int32_t)get_be(d + q, 4);
            q += 4;
            PyObject *c;
            if (n < 0) c = Py_NewRef(Py_None);
            else c = binary_canon(i == 0 ? K_TEXT : kinds[i - 1], d + q, n, h);
            if (c == NULL) { Py_DECREF(canon); goto out; }
            PyTuple_SET_ITEM(canon, i, c);
            if (n > 0) q += n;
        }
        int bad = digest_add(canon, h, &acc) < 0;
        Py_DECREF(canon);
        if (bad) goto out;
        count++;
        pos = q;
    }
    result = Py_BuildValue("(nnKKi)", pos, count, (unsigned long long)(acc >> 64),
                           (unsigned long long)acc, done);
out:
    PyMem_Free(dg.p);
    PyMem_Free(scratch.p);
    PyMem_Free(kinds);
    PyBuffer_Release(&buf);
    return result;
}

#ifdef REPLICATOR_SQLITE
#include "_rows_sqlite.c"
#endif

static PyMethodDef methods[] = {
    {"sort_changes", sort_changes, METH_O,
     "sort_changes(changes) -> (keys, changes) in key order, or None: see rowcodec.py"},
    {"encode_chunk", encode_chunk, METH_VARARGS,
     "encode_chunk(names, kinds, target, keys, changes of those keys, parts, helpers) -> "
     "(rows, count, digest_hi, digest_lo); target 2: rows as PostgreSQL binary COPY data "
     "(bytes); see rowcodec.py"},
    {"set_raw", py_set_raw, METH_O,
     "set_raw(on) -> previous: the raw JSON path on or off (tests and A/B runs compare the "
     "two paths; on by default)"},
    {"literal_is_repr", py_literal_is_repr, METH_O,
     "literal_is_repr(literal) -> bool: the exact 16/17-digit check's verdict (tests)"},
    {"blake2b_128", py_blake2b_128, METH_O,
     "blake2b_128(data) -> (hi, lo): BLAKE2b with a 16-byte digest, as two 64-bit halves"},
    {"digest_copy", digest_copy, METH_VARARGS,
     "digest_copy(kinds, data, helpers) -> (consumed, count, digest_hi, digest_lo, done)"},
    {"digest_rows", digest_rows, METH_VARARGS,
     "digest_rows(kinds, target, rows, helpers) -> (count, digest_hi, digest_lo)"},
#ifdef REPLICATOR_SQLITE
    {"sqlite_load", sqlite_load, METH_VARARGS,
     "sqlite_load(path as bytes, create_sql, insert_sql, names, kinds, keys, changes of those "
     "keys, parts, helpers, "
     "progress) -> (count, digest_hi, digest_lo): create the table and insert the live keys "
     "through a connection of its own, in one transaction"},
    {"sqlite_digest", sqlite_digest, METH_VARARGS,
     "sqlite_digest(path as bytes, select_sql, kinds, helpers) -> (count, digest_hi, digest_lo)"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "replicator.restore._rows",
    "Native restore row conversion and state digest (see replicator.restore.rowcodec).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rows(void) {
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    s_data = PyUnicode_InternFromString("data");
    s_version = PyUnicode_InternFromString("version");
    s_ts = PyUnicode_InternFromString("ts");
    if (!s_data || !s_version || !s_ts) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#ifdef REPLICATOR_SQLITE
    SqliteError = PyErr_NewException("replicator.restore._rows.SqliteError", NULL, NULL);
    if (SqliteError == NULL || PyModule_AddObjectRef(m, "SqliteError", SqliteError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
