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

/* the reference decoder for a value the scanner does not handle: odd(value, offset) ->
 * (key, is_delete, version); new references in *key and *version (-1 for None); 0 on
 * success, -1 with an exception set */
static int call_odd(PyObject *odd, const unsigned char *value, int32_t vlen, long long off,
                    PyObject **key, int *is_delete, PyObject **version) {
    PyErr_Clear();
    PyObject *v = PyBytes_FromStringAndSize((const char *)value, vlen);
    if (v == NULL) return -1;
    PyObject *res = PyObject_CallFunction(odd, "OL", v, off);
    Py_DECREF(v);
    if (res == NULL) return -1;
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 3) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "odd() must return (key, is_delete, version)");
        return -1;
    }
    PyObject *ver = PyTuple_GET_ITEM(res, 2);
    *is_delete = PyObject_IsTrue(PyTuple_GET_ITEM(res, 1));
    *version = ver == Py_None ? PyLong_FromLong(-1) : Py_NewRef(ver);
    *key = Py_NewRef(PyTuple_GET_ITEM(res, 0));
    Py_DECREF(res);
    if (*version == NULL || *is_delete < 0) {
        Py_XDECREF(*version);
        Py_DECREF(*key);
        return -1;
    }
    return 0;
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
        } else if (call_odd(odd, raw + vpos, vlen, off, &key, &is_delete, &version) < 0) {
            goto done;
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

/* -- KeySet: the keys a newest-first fold has decided ----------------------------------
 *
 * An open-addressing set of key bytes (64-bit FNV-1a hashes). A newest-first fold meets
 * most records for a key it has already decided; looking the raw bytes up here costs no
 * str, no Python hash and no dict probe. Keys of up to KS_INLINE bytes live in their
 * 32-byte slot, so a lookup touches one cache line of a table far larger than the caches;
 * longer keys are in an arena. Held in a capsule. */

#define KS_INLINE 16

typedef struct {
    uint64_t hash; /* 0: empty slot */
    uint32_t len;
    uint32_t pad;
    union {
        char bytes[KS_INLINE]; /* len <= KS_INLINE */
        uint64_t off;          /* else: the key bytes in the arena */
    } u;
} ks_slot;

typedef struct {
    ks_slot *slots;
    size_t cap, n; /* cap: a power of two */
    char *arena;
    size_t used, room;
} keyset_t;

static void ks_free(PyObject *capsule) {
    keyset_t *k = PyCapsule_GetPointer(capsule, "replicator.keyset");
    if (k == NULL) return;
    PyMem_Free(k->slots);
    PyMem_Free(k->arena);
    PyMem_Free(k);
}

static PyObject *keyset_new(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
    keyset_t *k = PyMem_Calloc(1, sizeof(keyset_t));
    if (k == NULL) return PyErr_NoMemory();
    k->cap = 1 << 16;
    k->slots = PyMem_Calloc(k->cap, sizeof(ks_slot));
    if (k->slots == NULL) { PyMem_Free(k); return PyErr_NoMemory(); }
    PyObject *c = PyCapsule_New(k, "replicator.keyset", ks_free);
    if (c == NULL) { PyMem_Free(k->slots); PyMem_Free(k); }
    return c;
}

/* tests narrow the hashes (set_keyset_hash_bits) so that different keys collide and the
 * byte comparison, inline and in the arena, is what tells them apart */
static uint64_t ks_hash_mask = ~0ULL;

static inline uint64_t ks_hash(const char *p, Py_ssize_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (Py_ssize_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 0x100000001b3ULL; }
    h &= ks_hash_mask;
    return h ? h : 1;
}

static PyObject *set_keyset_hash_bits(PyObject *Py_UNUSED(self), PyObject *arg) {
    long bits = PyLong_AsLong(arg);
    if (bits == -1 && PyErr_Occurred()) return NULL;
    if (bits < 1 || bits > 64) {
        PyErr_SetString(PyExc_ValueError, "bits: 1..64");
        return NULL;
    }
    ks_hash_mask = bits == 64 ? ~0ULL : ((1ULL << bits) - 1);
    Py_RETURN_NONE;
}

static inline const char *ks_bytes(const keyset_t *k, const ks_slot *s) {
    return s->len <= KS_INLINE ? s->u.bytes : k->arena + s->u.off;
}

/* start loading the slot where a lookup of hash h begins (a later ks_lookup_h then finds
 * it in the cache: probes of a table far larger than the caches overlap) */
static inline void ks_prefetch(const keyset_t *k, uint64_t h) {
    __builtin_prefetch(&k->slots[(size_t)h & (k->cap - 1)]);
}

static int ks_lookup_h(keyset_t *k, const char *p, Py_ssize_t n, uint64_t h, int add);

/* 1 if present; 0 if absent (and then added when `add`); -1 on memory error */
static int ks_lookup(keyset_t *k, const char *p, Py_ssize_t n, int add) {
    return ks_lookup_h(k, p, n, ks_hash(p, n), add);
}

/* ks_lookup with the key's ks_hash already computed */
static int ks_lookup_h(keyset_t *k, const char *p, Py_ssize_t n, uint64_t h, int add) {
    if ((uint64_t)n > UINT32_MAX) { /* never for a framed record; no GIL needed when !add */
        if (!add) return 0;
        PyErr_SetString(PyExc_OverflowError, "key too long");
        return -1;
    }
    size_t mask = k->cap - 1, i = (size_t)h & mask;
    for (;;) {
        ks_slot *s = &k->slots[i];
        if (s->hash == 0) break;
        if (s->hash == h && s->len == (uint32_t)n && memcmp(ks_bytes(k, s), p, n) == 0)
            return 1;
        i = (i + 1) & mask;
    }
    if (!add) return 0;
    ks_slot slot = {.hash = h, .len = (uint32_t)n};
    if (n <= KS_INLINE) {
        memcpy(slot.u.bytes, p, n);
    } else {
        if (k->used + (size_t)n > k->room) {
            size_t room = k->room ? k->room : 1 << 20;
            while (room < k->used + (size_t)n) room *= 2;
            char *a = PyMem_Realloc(k->arena, room);
            if (a == NULL) { PyErr_NoMemory(); return -1; }
            k->arena = a;
            k->room = room;
        }
        memcpy(k->arena + k->used, p, n);
        slot.u.off = k->used;
        k->used += n;
    }
    k->slots[i] = slot;
    if (++k->n * 2 > k->cap) { /* keep the load under 1/2 */
        size_t cap = k->cap * 2;
        ks_slot *ns = PyMem_Calloc(cap, sizeof(ks_slot));
        if (ns == NULL) { PyErr_NoMemory(); return -1; }
        for (size_t j = 0; j < k->cap; j++) {
            if (k->slots[j].hash == 0) continue;
            size_t q = (size_t)k->slots[j].hash & (cap - 1);
            while (ns[q].hash) q = (q + 1) & (cap - 1);
            ns[q] = k->slots[j];
        }
        PyMem_Free(k->slots);
        k->slots = ns;
        k->cap = cap;
    }
    return 0;
}

/* -- fold_block_latest: newest first ------------------------------------------------- */

typedef struct {
    head_t h;
    uint64_t hash; /* ks_hash of h.key when fast */
    int fast; /* h is valid */
    int cand; /* may decide its key (passes the filters, key not decided before) */
} rec_t;

/* records ahead whose slot is prefetched during the decided-key lookups of pass 2 */
#define KS_AHEAD 8

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
    PyObject *cut_obj, *out, *keys, *odd, *seen_o = Py_None;
    int keep_record;
    if (!PyArg_ParseTuple(args, "y*LLOLO!OpO|O", &buf, &lo, &hi, &cut_obj, &rank, &PyDict_Type,
                          &out, &keys, &keep_record, &odd, &seen_o))
        return NULL;
    keyset_t *seen = NULL;
    if (seen_o != Py_None) {
        seen = PyCapsule_GetPointer(seen_o, "replicator.keyset");
        if (seen == NULL) { PyBuffer_Release(&buf); return NULL; }
    }
    int has_cut = cut_obj != Py_None;
    long long cut_ms = 0;
    PyObject *result = NULL, *rank_o = NULL, *empty = NULL, *hdr_o = NULL;
    Py_ssize_t *starts = NULL, nrec = 0, cap = 0;
    rec_t *recs = NULL;
    const char *hdr_p = NULL; /* the bytes hdr_o holds, to share it between records */
    Py_ssize_t hdr_n = 0;
    if (has_cut && (cut_ms = PyLong_AsLongLong(cut_obj)) == -1 && PyErr_Occurred()) goto done;
    if (keys == Py_None) keys = NULL;
    rank_o = PyLong_FromLongLong(rank);
    empty = PyBytes_FromStringAndSize(NULL, 0);
    if (rank_o == NULL || empty == NULL) goto done;
    const unsigned char *raw = buf.buf;
    Py_ssize_t size = buf.len, pos = 0;
    /* passes 1 and 2 touch only the payload and `seen` (owned by this fold): without the
     * GIL, so that another thread can decompress or fold meanwhile */
    const char *err = NULL;
    Py_ssize_t err_pos = 0;
    long long n = 0;
    Py_BEGIN_ALLOW_THREADS
    /* pass 1: where each record starts (framing checked) */
    while (pos < size) {
        if (nrec == cap) {
            cap = cap ? cap * 2 : 4096;
            Py_ssize_t *p = realloc(starts, cap * sizeof(Py_ssize_t));
            if (p == NULL) { err = "out of memory"; break; }
            starts = p;
        }
        starts[nrec++] = pos;
        if (size - pos < REC_HEADER) { err = "truncated record header"; err_pos = pos; break; }
        const unsigned char *r = raw + pos;
        int32_t klen = rd_i32(r + 17), vlen = rd_i32(r + 21);
        uint16_t hcount = rd_u16(r + 25);
        pos += REC_HEADER;
        if (klen > 0) {
            if (klen > size - pos) { err = "key beyond the payload"; err_pos = pos; break; }
            pos += klen;
        }
        if (vlen > 0) {
            if (vlen > size - pos) { err = "value beyond the payload"; err_pos = pos; break; }
            pos += vlen;
        }
        for (unsigned i = 0; i < hcount && err == NULL; i++) {
            if (size - pos < 2) { err = "truncated header name"; err_pos = pos; break; }
            pos += 2 + rd_u16(raw + pos);
            if (size - pos < 4) { err = "truncated header value"; err_pos = pos; break; }
            int32_t hv = rd_i32(raw + pos);
            pos += 4;
            if (hv > 0) {
                if (hv > size - pos) { err = "header beyond the payload"; err_pos = pos; break; }
                pos += hv;
            }
        }
        if (err != NULL) break;
        if (pos > size) { err = "record beyond the payload"; err_pos = pos; break; }
    }
    /* pass 2: which records may decide a key (scan, filters, keys decided before) */
    if (err == NULL && nrec > 0) {
        recs = malloc(nrec * sizeof(rec_t));
        if (recs == NULL) err = "out of memory";
    }
    /* 2a: scan each record's envelope (sequential reads of the payload) */
    for (Py_ssize_t ri = nrec - 1; err == NULL && ri >= 0; ri--) {
        rec_t *rec = &recs[ri];
        const unsigned char *r = raw + starts[ri];
        long long off = rd_i64(r), ts = rd_i64(r + 8);
        int32_t klen = rd_i32(r + 17), vlen = rd_i32(r + 21);
        Py_ssize_t vpos = starts[ri] + REC_HEADER + (klen > 0 ? klen : 0);
        rec->cand = 0;
        rec->fast = 0;
        if (off < lo || off >= hi || vlen < 0) continue;
        if (has_cut && ts > cut_ms) continue;
        n++;
        rec->cand = 1;
        rec->fast = scan_head((const char *)raw + vpos, vlen, &rec->h);
        if (rec->fast && seen != NULL) rec->hash = ks_hash(rec->h.key, rec->h.key_len);
    }
    /* 2b: decided already? (the raw bytes of an escape-free key are its UTF-8) The slots
     * of the records KS_AHEAD further on are loaded meanwhile: random probes of a large
     * table, overlapped instead of one after another. */
    if (err == NULL && seen != NULL) {
        for (Py_ssize_t ri = nrec - 1; ri >= 0; ri--) {
            if (ri - KS_AHEAD >= 0 && recs[ri - KS_AHEAD].fast)
                ks_prefetch(seen, recs[ri - KS_AHEAD].hash);
            rec_t *rec = &recs[ri];
            if (rec->cand && rec->fast &&
                ks_lookup_h(seen, rec->h.key, rec->h.key_len, rec->hash, 0) == 1)
                rec->cand = 0;
        }
    }
    Py_END_ALLOW_THREADS
    if (err != NULL) {
        free(recs);
        recs = NULL;
        if (strcmp(err, "out of memory") == 0) PyErr_NoMemory();
        else corrupt(err, err_pos);
        goto done;
    }
    /* pass 3, with the GIL: the candidates, newest first */
    for (Py_ssize_t ri = nrec - 1; ri >= 0; ri--) {
        rec_t *rec = &recs[ri];
        if (!rec->cand) continue;
        Py_ssize_t p0 = starts[ri], end = ri + 1 < nrec ? starts[ri + 1] : size;
        const unsigned char *r = raw + p0;
        long long off = rd_i64(r), ts = rd_i64(r + 8);
        int32_t klen = rd_i32(r + 17), vlen = rd_i32(r + 21);
        uint16_t hcount = rd_u16(r + 25);
        Py_ssize_t kpos = p0 + REC_HEADER;
        Py_ssize_t vpos = kpos + (klen > 0 ? klen : 0);
        Py_ssize_t hpos = vpos + (vlen > 0 ? vlen : 0);
        head_t h = rec->h;
        PyObject *key = NULL, *version = NULL;
        int is_delete;
        int fast = rec->fast;
        if (fast && seen != NULL && ks_lookup_h(seen, h.key, h.key_len, rec->hash, 0) == 1)
            continue; /* decided by a newer record of this block */
        int fastkey = 0; /* key decoded from h.key (whose hash is rec->hash) */
        if (fast && (key = PyUnicode_DecodeUTF8(h.key, h.key_len, NULL)) != NULL) {
            is_delete = h.is_delete;
            fastkey = 1;
        } else if (call_odd(odd, raw + vpos, vlen, off, &key, &is_delete, &version) < 0) {
            goto done;
        }
        int seen_key;
        if (fastkey && seen != NULL) {
            /* `seen` holds every key of `out` (each is added here before it is stored):
             * one insertion instead of a dict probe and a second set lookup */
            seen_key = ks_lookup_h(seen, h.key, h.key_len, rec->hash, 1);
        } else {
            seen_key = PyDict_Contains(out, key);
        }
        if (seen_key == 0 && seen != NULL && !fastkey) {
            Py_ssize_t kn;
            const char *kp = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &kn) : NULL;
            if (kp == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "a record key must be a str");
                seen_key = -1;
            } else {
                seen_key = ks_lookup(seen, kp, kn, 1); /* decided from here on */
            }
        }
        if (seen_key == 0 && keys != NULL) {
            int in = PySequence_Contains(keys, key);
            seen_key = in < 0 ? -1 : !in;
        }
        if (seen_key != 0) {
            Py_DECREF(key);
            Py_XDECREF(version);
            if (seen_key < 0) goto done;
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
    free(recs);
    free(starts);
    Py_XDECREF(rank_o);
    Py_XDECREF(empty);
    Py_XDECREF(hdr_o);
    PyBuffer_Release(&buf);
    return result;
}

/* -- merge_changes: the cross-partition merge of replay -------------------------------- */

/* a change's (version, ts, rank) as integers: 1, else 0 (not plain: the caller's `beats`) */
static int change_rank(PyObject *t, long long v[3]) {
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) < 3) return 0;
    for (int i = 0; i < 3; i++) {
        PyObject *x = PyTuple_GET_ITEM(t, i);
        if (!PyLong_CheckExact(x)) return 0;
        int overflow;
        v[i] = PyLong_AsLongLongAndOverflow(x, &overflow);
        if (overflow || (v[i] == -1 && PyErr_Occurred())) { PyErr_Clear(); return 0; }
    }
    return 1;
}

/* merge_changes(merged, local, beats) -> None: for each key of `local`, its change goes
 * into `merged` when `merged` has none or beats(change, current) -- replay's loop, with
 * (version, ts, rank) compared here when they are plain integers */
static PyObject *merge_changes(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *merged, *local, *beats;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyDict_Type, &merged, &PyDict_Type, &local, &beats))
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *change;
    while (PyDict_Next(local, &pos, &key, &change)) {
        PyObject *cur = PyDict_GetItemWithError(merged, key);
        if (cur == NULL && PyErr_Occurred()) return NULL;
        int take = cur == NULL;
        if (!take) {
            long long a[3], b[3];
            if (change_rank(change, a) && change_rank(cur, b)) {
                take = a[0] != b[0] ? a[0] > b[0] : a[1] != b[1] ? a[1] > b[1] : a[2] > b[2];
            } else {
                PyObject *r = PyObject_CallFunctionObjArgs(beats, change, cur, NULL);
                if (r == NULL) return NULL;
                take = PyObject_IsTrue(r);
                Py_DECREF(r);
                if (take < 0) return NULL;
            }
        }
        if (take && PyDict_SetItem(merged, key, change) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fold_block", fold_block, METH_VARARGS,
     "fold_block(raw, lo, hi, cut_ms, stop_ms, rank, out, keys, keep_record, last_hdr, "
     "last_hcount, odd) -> (n, status, stopped, last_hdr, last_hcount); see foldblock.py"},
    {"keyset", keyset_new, METH_NOARGS,
     "keyset() -> a capsule for fold_block_latest's `seen` argument"},
    {"set_keyset_hash_bits", set_keyset_hash_bits, METH_O,
     "tests only: keep this many bits of the key hashes (64: all), to force collisions"},
    {"fold_block_latest", fold_block_latest, METH_VARARGS,
     "fold_block_latest(raw, lo, hi, cut_ms, rank, out, keys, keep_record, odd) -> n; "
     "see foldblock.py"},
    {"merge_changes", merge_changes, METH_VARARGS,
     "merge_changes(merged, local, beats) -> None; see replay.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "replicator.restore._fold",
    "Native replay fold of one segment block (see replicator.restore.foldblock).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fold(void) { return PyModule_Create(&module); }
