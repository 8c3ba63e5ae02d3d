/*
 * replicator.restore._fold -- the native form of replicator.restore.foldblock.fold_block_py.
 *
 * Walks the records of one uncompressed segment block payload (docs/FORMAT.md 2.3) and
 * folds them into a dict: key -> the last change (partition order). It reads only the
 * envelope's top-level "key", "op" and "version" of each value; anything this scanner does
 * not handle plainly (escapes in a name or key, a version that is not a plain integer,
 * duplicate fields, malformed JSON at the top level) is handed to the Python callable
 * `odd(value, offset)`, which decodes it the reference way or raises CorruptSegmentError.
 * The result is therefore the same as the Python reference for every input; tests compare
 * the two on generated and hostile blocks.
 *
 * Invariants kept from the reference: the stored tuple is
 *   (version or -1, ts, rank, offset, value bytes or None for a delete,
 *    Kafka key bytes if keep_record else None, encoded headers if keep_record and any else b"")
 * and consecutive records carrying identical header bytes share one bytes object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define REC_HEADER 27 /* <qqbiiH */

static inline int64_t rd_i64(const unsigned char *p) { int64_t v; memcpy(&v, p, 8); return v; }
static inline int32_t rd_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t rd_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* -- a minimal scanner of the envelope's top level ------------------------------------ */

typedef struct {
    const char *key; Py_ssize_t key_len;   /* raw bytes of the key string (no escapes) */
    int is_delete;
    int has_version; long long version;   /* has_version 0: absent or null */
} head_t;

static inline const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* a string starting at p (on the opening quote); sets *s,*n to its contents; returns the
 * position after the closing quote, or NULL if it has an escape or is unterminated */
static inline const char *plain_string(const char *p, const char *end, const char **s,
                                       Py_ssize_t *n) {
    const char *q = memchr(p + 1, '"', end - (p + 1));
    if (q == NULL || memchr(p + 1, '\\', q - (p + 1)) != NULL) return NULL;
    *s = p + 1;
    *n = q - (p + 1);
    return q + 1;
}

/* the position after the string starting at p (on its opening quote), escapes allowed: a
 * quote ends the string when an even number of backslashes precedes it; NULL if unclosed */
static inline const char *skip_string(const char *p, const char *end) {
    const char *q = p + 1;
    for (;;) {
        q = memchr(q, '"', end - q);
        if (q == NULL) return NULL;
        const char *b = q;
        while (b > p + 1 && b[-1] == '\\') b--;
        if (((q - b) & 1) == 0) return q + 1;
        q++;
    }
}

/* skip any JSON value starting at p; lenient inside nested values (the full document was
 * parsed at ingest and the block is checksummed); NULL when the structure does not close */
static const char *skip_value(const char *p, const char *end) {
    if (p >= end) return NULL;
    char c = *p;
    if (c == '"') return skip_string(p, end);
    if (c == '{' || c == '[') {
        int depth = 0;
        while (p < end) {
            c = *p;
            if (c == '"') {
                p = skip_string(p, end);
                if (p == NULL) return NULL;
                continue;
            }
            if (c == '{' || c == '[') {
                depth++;
            } else if (c == '}' || c == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return NULL;
    }
    /* number or literal */
    const char *q = p;
    while (q < end && *q != ',' && *q != '}' && *q != ']' && *q != ' ' && *q != '\t' &&
           *q != '\n' && *q != '\r')
        q++;
    return q == p ? NULL : q;
}

/* 1 on success; 0 when the value must go to the reference decoder */
static int scan_head(const char *p, Py_ssize_t len, head_t *h) {
    const char *end = p + len;
    int seen_key = 0, seen_op = 0, seen_version = 0;
    h->has_version = 0;
    h->is_delete = 0;
    p = ws(p, end);
    if (p >= end || *p != '{') return 0;
    p = ws(p + 1, end);
    if (p < end && *p == '}') return 0; /* no key: the reference raises */
    for (;;) {
        const char *name; Py_ssize_t nlen;
        if (p >= end || *p != '"') return 0;
        p = plain_string(p, end, &name, &nlen);
        if (p == NULL) return 0;
        p = ws(p, end);
        if (p >= end || *p != ':') return 0;
        p = ws(p + 1, end);
        if (p >= end) return 0;
        if (nlen == 3 && memcmp(name, "key", 3) == 0) {
            if (seen_key++ || *p != '"') return 0;
            p = plain_string(p, end, &h->key, &h->key_len);
            if (p == NULL) return 0;
        } else if (nlen == 2 && memcmp(name, "op", 2) == 0) {
            const char *s; Py_ssize_t n;
            if (seen_op++ || *p != '"') return 0;
            p = plain_string(p, end, &s, &n);
            if (p == NULL) return 0;
            h->is_delete = (n == 6 && memcmp(s, "delete", 6) == 0);
        } else if (nlen == 7 && memcmp(name, "version", 7) == 0) {
            if (seen_version++) return 0;
            if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
                p += 4;
            } else {
                int neg = 0, digits = 0;
                long long v = 0;
                if (*p == '-') { neg = 1; p++; }
                if (p < end && *p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9')
                    return 0; /* leading zero: not JSON */
                while (p < end && *p >= '0' && *p <= '9') {
                    if (++digits > 18) return 0;
                    v = v * 10 + (*p - '0');
                    p++;
                }
                if (digits == 0) return 0;
                if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) return 0;
                h->has_version = 1;
                h->version = neg ? -v : v;
            }
        } else {
            p = skip_value(p, end);
            if (p == NULL) return 0;
        }
        p = ws(p, end);
        if (p >= end) return 0;
        if (*p == ',') { p = ws(p + 1, end); continue; }
        if (*p == '}') { p++; break; }
        return 0;
    }
    p = ws(p, end);
    if (p != end) return 0;
    return seen_key && seen_op;
}

/* -- fold_block ------------------------------------------------------------------------ */

static PyObject *corrupt(const char *what, long long pos) {
    PyErr_Format(PyExc_ValueError, "record framing: %s at payload byte %lld", what, pos);
    return NULL;
}

static PyObject *fold_block(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer buf;
    long long lo, hi, rank;
    PyObject *cut_obj, *stop_obj, *out, *keys, *last_hdr, *odd;
    int keep_record;
    long long last_hcount;
    if (!PyArg_ParseTuple(args, "y*LLOOLO!OpSLO", &buf, &lo, &hi, &cut_obj, &stop_obj, &rank,
                          &PyDict_Type, &out, &keys, &keep_record, &last_hdr, &last_hcount,
                          &odd))
        return NULL;
    int has_cut = cut_obj != Py_None, has_stop = stop_obj != Py_None;
    long long cut_ms = 0, stop_ms = 0;
    PyObject *result = NULL, *rank_o = NULL, *empty = NULL;
    Py_INCREF(last_hdr);
    if (has_cut && (cut_ms = PyLong_AsLongLong(cut_obj)) == -1 && PyErr_Occurred()) goto done;
    if (has_stop && (stop_ms = PyLong_AsLongLong(stop_obj)) == -1 && PyErr_Occurred())
        goto done;
    if (keys == Py_None) keys = NULL;
    rank_o = PyLong_FromLongLong(rank);
    empty = PyBytes_FromStringAndSize(NULL, 0);
    if (rank_o == NULL || empty == NULL) goto done;

    const unsigned char *raw = buf.buf;
    Py_ssize_t size = buf.len, pos = 0;
    long long n = 0;
    int status = 0;
    long long stopped = 0;
    while (pos < size) {
        if (size - pos < REC_HEADER) { corrupt("truncated record header", pos); goto done; }
        const unsigned char *r = raw + pos;
        long long off = rd_i64(r), ts = rd_i64(r + 8);
        int32_t klen = rd_i32(r + 17), vlen = rd_i32(r + 21);
        uint16_t hcount = rd_u16(r + 25);
        pos += REC_HEADER;
        Py_ssize_t kpos = pos;
        if (klen >= 0) {
            if (klen > size - pos) { corrupt("key beyond the payload", pos); goto done; }
            pos += klen;
        }
        Py_ssize_t vpos = pos;
        if (vlen >= 0) {
            if (vlen > size - pos) { corrupt("value beyond the payload", pos); goto done; }
            pos += vlen;
        }
        if (hcount) {
            Py_ssize_t hl = PyBytes_GET_SIZE(last_hdr);
            if (hcount == last_hcount && hl <= size - pos &&
                memcmp(raw + pos, PyBytes_AS_STRING(last_hdr), hl) == 0) {
                pos += hl;
            } else {
                Py_ssize_t start = pos;
                for (unsigned i = 0; i < hcount; i++) {
                    if (size - pos < 2) { corrupt("truncated header name", pos); goto done; }
                    pos += 2 + rd_u16(raw + pos);
                    if (size - pos < 4) { corrupt("truncated header value", pos); goto done; }
                    int32_t hv = rd_i32(raw + pos);
                    pos += 4;
                    if (hv > 0) {
                        if (hv > size - pos) { corrupt("header beyond the payload", pos); goto done; }
                        pos += hv;
                    }
                }
                PyObject *h = PyBytes_FromStringAndSize((const char *)raw + start, pos - start);
                if (h == NULL) goto done;
                Py_SETREF(last_hdr, h);
                last_hcount = hcount;
            }
        }
        if (off < lo || vlen < 0) continue;
        if (off >= hi) { status = 1; break; }
        if (has_stop && ts > stop_ms) { status = 2; stopped = off; break; }
        if (has_cut && ts > cut_ms) continue;
        n++;
        head_t h;
        PyObject *key = NULL, *version = NULL;
        int is_delete;
        if (scan_head((const char *)raw + vpos, vlen, &h) &&
            (key = PyUnicode_DecodeUTF8(h.key, h.key_len, NULL)) != NULL) {
            is_delete = h.is_delete;
            version = PyLong_FromLongLong(h.has_version ? h.version : -1);
            if (version == NULL) { Py_DECREF(key); goto done; }
        } else {
            PyErr_Clear();
            PyObject *v = PyBytes_FromStringAndSize((const char *)raw + vpos, vlen);
            if (v == NULL) goto done;
            PyObject *res = PyObject_CallFunction(odd, "OL", v, off);
            Py_DECREF(v);
            if (res == NULL) goto done;
            if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 3) {
                Py_DECREF(res);
                PyErr_SetString(PyExc_TypeError, "odd() must return (key, is_delete, version)");
                goto done;
            }
            key = PyTuple_GET_ITEM(res, 0);
            Py_INCREF(key);
            is_delete = PyObject_IsTrue(PyTuple_GET_ITEM(res, 1));
            PyObject *ver = PyTuple_GET_ITEM(res, 2);
            if (ver == Py_None) {
                version = PyLong_FromLong(-1);
            } else {
                version = ver;
                Py_INCREF(version);
            }
            Py_DECREF(res);
            if (version == NULL || is_delete < 0) { Py_XDECREF(version); Py_DECREF(key); goto done; }
        }
        if (keys != NULL) {
            int in = PySequence_Contains(keys, key);
            if (in <= 0) {
                Py_DECREF(key);
                Py_DECREF(version);
                if (in < 0) goto done;
                continue;
            }
        }
        PyObject *ts_o = PyLong_FromLongLong(ts), *off_o = PyLong_FromLongLong(off);
        PyObject *val_o, *k_o, *h_o;
        if (is_delete) { val_o = Py_None; Py_INCREF(val_o); }
        else val_o = PyBytes_FromStringAndSize((const char *)raw + vpos, vlen);
        if (keep_record && klen >= 0)
            k_o = PyBytes_FromStringAndSize((const char *)raw + kpos, klen);
        else { k_o = Py_None; Py_INCREF(k_o); }
        h_o = (keep_record && hcount) ? last_hdr : empty;
        Py_INCREF(h_o);
        Py_INCREF(rank_o);
        PyObject *items[7] = {version, ts_o, rank_o, off_o, val_o, k_o, h_o};
        if (ts_o == NULL || off_o == NULL || val_o == NULL || k_o == NULL) {
            for (int i = 0; i < 7; i++) Py_XDECREF(items[i]);
            Py_DECREF(key);
            goto done;
        }
        PyObject *cur = PyDict_GetItemWithError(out, key);
        if (cur == NULL && PyErr_Occurred()) {
            for (int i = 0; i < 7; i++) Py_DECREF(items[i]);
            Py_DECREF(key);
            goto done;
        }
        if (cur != NULL && PyTuple_CheckExact(cur) && PyTuple_GET_SIZE(cur) == 7 &&
            Py_REFCNT(cur) == 1) {
            /* only the dict holds the previous change: update it in place (no tuple
             * allocation, no re-insertion; the dict's memory is touched once) */
            for (int i = 0; i < 7; i++) {
                PyObject *old = PyTuple_GET_ITEM(cur, i);
                PyTuple_SET_ITEM(cur, i, items[i]);
                Py_DECREF(old);
            }
            Py_DECREF(key);
            continue;
        }
        PyObject *t = PyTuple_New(7);
        if (t == NULL) {
            for (int i = 0; i < 7; i++) Py_DECREF(items[i]);
            Py_DECREF(key);
            goto done;
        }
        for (int i = 0; i < 7; i++) PyTuple_SET_ITEM(t, i, items[i]);
        /* ints, bytes and None only: it can never be part of a cycle */
        PyObject_GC_UnTrack(t);
        int rc = PyDict_SetItem(out, key, t);
        Py_DECREF(t);
        Py_DECREF(key);
        if (rc < 0) goto done;
    }
    if (status == 2)
        result = Py_BuildValue("LiLOL", n, status, stopped, last_hdr, last_hcount);
    else
        result = Py_BuildValue("LiOOL", n, status, Py_None, last_hdr, last_hcount);
done:
    Py_XDECREF(rank_o);
    Py_XDECREF(empty);
    Py_DECREF(last_hdr);
    PyBuffer_Release(&buf);
    return result;
}

/* -- fold_block_latest: newest first ------------------------------------------------- */

/* fold_block_latest(raw, lo, hi, cut_ms, rank, out, keys, keep_record, odd) -> n
 *
 * Walks the block's records newest first and stores a change only for keys not yet in
 * `out`: called on a partition's blocks from the newest back, the first change seen for a
 * key is its last one, and an older change costs a lookup instead of a new value. Records
 * outside [lo, hi), with a null value or a timestamp above cut_ms are skipped; n counts the
 * records read (before the `keys` filter), as fold_block does. */
static PyObject *fold_block_latest(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer buf;
    long long lo, hi, rank;
    PyObject *cut_obj, *out, *keys, *odd;
    int keep_record;
    if (!PyArg_ParseTuple(args, "y*LLOLO!OpO", &buf, &lo, &hi, &cut_obj, &rank, &PyDict_Type,
                          &out, &keys, &keep_record, &odd))
        return NULL;
    int has_cut = cut_obj != Py_None;
    long long cut_ms = 0;
    PyObject *result = NULL, *rank_o = NULL, *empty = NULL, *hdr_o = NULL;
    Py_ssize_t *starts = NULL, nrec = 0, cap = 0;
    const char *hdr_p = NULL; /* the bytes hdr_o holds, to share it between records */
    Py_ssize_t hdr_n = 0;
    if (has_cut && (cut_ms = PyLong_AsLongLong(cut_obj)) == -1 && PyErr_Occurred()) goto done;
    if (keys == Py_None) keys = NULL;
    rank_o = PyLong_FromLongLong(rank);
    empty = PyBytes_FromStringAndSize(NULL, 0);
    if (rank_o == NULL || empty == NULL) goto done;
    const unsigned char *raw = buf.buf;
    Py_ssize_t size = buf.len, pos = 0;
    /* pass 1: where each record starts (framing checked) */
    while (pos < size) {
        if (nrec == cap) {
            cap = cap ? cap * 2 : 4096;
            Py_ssize_t *p = PyMem_Realloc(starts, cap * sizeof(Py_ssize_t));
            if (p == NULL) { PyErr_NoMemory(); goto done; }
            starts = p;
        }
        starts[nrec++] = pos;
        if (size - pos < REC_HEADER) { corrupt("truncated record header", pos); goto done; }
        const unsigned char *r = raw + pos;
        int32_t klen = rd_i32(r + 17), vlen = rd_i32(r + 21);
        uint16_t hcount = rd_u16(r + 25);
        pos += REC_HEADER;
        if (klen > 0) {
            if (klen > size - pos) { corrupt("key beyond the payload", pos); goto done; }
            pos += klen;
        }
        if (vlen > 0) {
            if (vlen > size - pos) { corrupt("value beyond the payload", pos); goto done; }
            pos += vlen;
        }
        for (unsigned i = 0; i < hcount; i++) {
            if (size - pos < 2) { corrupt("truncated header name", pos); goto done; }
            pos += 2 + rd_u16(raw + pos);
            if (size - pos < 4) { corrupt("truncated header value", pos); goto done; }
            int32_t hv = rd_i32(raw + pos);
            pos += 4;
            if (hv > 0) {
                if (hv > size - pos) { corrupt("header beyond the payload", pos); goto done; }
                pos += hv;
            }
        }
        if (pos > size) { corrupt("record beyond the payload", pos); goto done; }
    }
    /* pass 2: newest first */
    long long n = 0;
    for (Py_ssize_t ri = nrec - 1; ri >= 0; ri--) {
        Py_ssize_t p0 = starts[ri], end = ri + 1 < nrec ? starts[ri + 1] : size;
        const unsigned char *r = raw + p0;
        long long off = rd_i64(r), ts = rd_i64(r + 8);
        int32_t klen = rd_i32(r + 17), vlen = rd_i32(r + 21);
        uint16_t hcount = rd_u16(r + 25);
        Py_ssize_t kpos = p0 + REC_HEADER;
        Py_ssize_t vpos = kpos + (klen > 0 ? klen : 0);
        Py_ssize_t hpos = vpos + (vlen > 0 ? vlen : 0);
        if (off < lo || off >= hi || vlen < 0) continue;
        if (has_cut && ts > cut_ms) continue;
        n++;
        head_t h;
        PyObject *key = NULL, *version = NULL;
        int is_delete;
        if (scan_head((const char *)raw + vpos, vlen, &h) &&
            (key = PyUnicode_DecodeUTF8(h.key, h.key_len, NULL)) != NULL) {
            is_delete = h.is_delete;
        } else {
            PyErr_Clear();
            PyObject *v = PyBytes_FromStringAndSize((const char *)raw + vpos, vlen);
            if (v == NULL) goto done;
            PyObject *res = PyObject_CallFunction(odd, "OL", v, off);
            Py_DECREF(v);
            if (res == NULL) goto done;
            if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 3) {
                Py_DECREF(res);
                PyErr_SetString(PyExc_TypeError, "odd() must return (key, is_delete, version)");
                goto done;
            }
            key = Py_NewRef(PyTuple_GET_ITEM(res, 0));
            is_delete = PyObject_IsTrue(PyTuple_GET_ITEM(res, 1));
            PyObject *ver = PyTuple_GET_ITEM(res, 2);
            version = ver == Py_None ? PyLong_FromLong(-1) : Py_NewRef(ver);
            Py_DECREF(res);
            if (version == NULL || is_delete < 0) { Py_XDECREF(version); Py_DECREF(key); goto done; }
        }
        int seen = PyDict_Contains(out, key);
        if (seen == 0 && keys != NULL) {
            int in = PySequence_Contains(keys, key);
            seen = in < 0 ? -1 : !in;
        }
        if (seen != 0) {
            Py_DECREF(key);
            Py_XDECREF(version);
            if (seen < 0) goto done;
            continue;
        }
        if (version == NULL) {
            version = PyLong_FromLongLong(h.has_version ? h.version : -1);
            if (version == NULL) { Py_DECREF(key); goto done; }
        }
        PyObject *h_o = empty;
        if (keep_record && hcount) {
            Py_ssize_t hn = end - hpos;
            if (hdr_o == NULL || hn != hdr_n || memcmp(hdr_p, raw + hpos, hn) != 0) {
                PyObject *nh = PyBytes_FromStringAndSize((const char *)raw + hpos, hn);
                if (nh == NULL) { Py_DECREF(key); Py_DECREF(version); goto done; }
                Py_XSETREF(hdr_o, nh);
                hdr_p = PyBytes_AS_STRING(hdr_o);
                hdr_n = hn;
            }
            h_o = hdr_o;
        }
        PyObject *items[7] = {
            version, PyLong_FromLongLong(ts), Py_NewRef(rank_o), PyLong_FromLongLong(off),
            is_delete ? Py_NewRef(Py_None)
                      : PyBytes_FromStringAndSize((const char *)raw + vpos, vlen),
            (keep_record && klen >= 0)
                ? PyBytes_FromStringAndSize((const char *)raw + kpos, klen) : Py_NewRef(Py_None),
            Py_NewRef(h_o),
        };
        PyObject *t = PyTuple_New(7);
        int bad = t == NULL;
        for (int i = 0; i < 7; i++) {
            if (items[i] == NULL) bad = 1;
            if (t != NULL) PyTuple_SET_ITEM(t, i, items[i]);
            else Py_XDECREF(items[i]);
        }
        if (bad) { Py_XDECREF(t); Py_DECREF(key); goto done; }
        PyObject_GC_UnTrack(t); /* ints, bytes and None only */
        int rc = PyDict_SetItem(out, key, t);
        Py_DECREF(t);
        Py_DECREF(key);
        if (rc < 0) goto done;
    }
    result = PyLong_FromLongLong(n);
done:
    PyMem_Free(starts);
    Py_XDECREF(rank_o);
    Py_XDECREF(empty);
    Py_XDECREF(hdr_o);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"fold_block", fold_block, METH_VARARGS,
     "fold_block(raw, lo, hi, cut_ms, stop_ms, rank, out, keys, keep_record, last_hdr, "
     "last_hcount, odd) -> (n, status, stopped, last_hdr, last_hcount); see foldblock.py"},
    {"fold_block_latest", fold_block_latest, METH_VARARGS,
     "fold_block_latest(raw, lo, hi, cut_ms, rank, out, keys, keep_record, odd) -> n; "
     "see foldblock.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "replicator.restore._fold",
    "Native replay fold of one segment block (see replicator.restore.foldblock).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fold(void) { return PyModule_Create(&module); }
