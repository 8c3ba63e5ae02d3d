/*
 * replicator.restore._rows, SQLite part: included by _rows.c when setup.py finds SQLite's
 * headers (REPLICATOR_SQLITE); without them the module has no sqlite_* functions and the
 * SQLite target uses the sqlite3 module.
 *
 * sqlite_load:   live keys in key order -> rows inserted through a connection of its own
 *                (the raw path binds straight from the event's bytes; other events go
 *                through the orjson path or the reference, as in encode_chunk) and the
 *                backup side of the state digest.
 * sqlite_digest: the rows of a table read back through a connection of its own -> the
 *                target side of the state digest, without a Python object per value.
 *
 * The loader inserts on a thread of its own, the reader reads SQLite on a thread of its
 * own (see below): SQLite's work and ours overlap on two cores, and the calling thread
 * waits for the other without the GIL, so the event loop thread keeps running.
 */
#include <sqlite3.h>

static PyObject *SqliteError;

static int sq_error(sqlite3 *db, int rc, const char *what) {
    PyErr_Format(SqliteError, "%s: %s", what, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    return -1;
}

static int sq_exec(sqlite3 *db, const char *sql) {
    char *err = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_exec(db, sql, NULL, NULL, &err);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        PyErr_Format(SqliteError, "%s", err ? err : sqlite3_errstr(rc));
        sqlite3_free(err);
        return -1;
    }
    return 0;
}

static sqlite3 *sq_open(const char *path, int flags) {
    sqlite3 *db = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_open_v2(path, &db, flags, NULL);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        sq_error(db, rc, "open");
        sqlite3_close(db);
        return NULL;
    }
    sqlite3_busy_timeout(db, 10000);
    return db;
}

/* -- the loader: conversion on the calling thread, inserts on a thread of their own ----
 *
 * The calling thread (holding the GIL) parses each event and writes its bind-ready values
 * into a chunk; a second thread (no Python at all) binds and steps the chunks' rows, so
 * parsing and SQLite's B-tree work overlap on two cores. At most QDEPTH chunks wait
 * (bounded memory). Either side's failure stops both: the inserter's message becomes a
 * SqliteError, the converter's exception is raised as it is; the transaction is then
 * rolled back by closing the connection. Chunks live in malloc'd memory (freed by the
 * inserter without the GIL). */

#include <pthread.h>

enum { QDEPTH = 4, CHUNK_ROWS = 512 };
enum { V_NULL = 'N', V_INT = 'I', V_REAL = 'D', V_TEXT = 'T', V_BLOB = 'B' };
/* the loader's rows end with V_HASH and a digest text the inserter hashes, or V_NULL when
 * the calling thread has hashed the row itself */
enum { V_HASH = 'H' };

typedef struct { char *p; size_t len, cap, rows; } chunk_t;

/* chunk appenders without Python (either thread): 0 ok, -1 out of memory or a value of
 * 2 GiB or more */
static int ckr_reserve(chunk_t *c, size_t more) {
    if (c->len + more <= c->cap) return 0;
    size_t cap = c->cap ? c->cap : (size_t)1 << 18;
    while (cap < c->len + more) cap *= 2;
    char *p = realloc(c->p, cap);
    if (p == NULL) return -1;
    c->p = p;
    c->cap = cap;
    return 0;
}

static int ckr_null(chunk_t *c) {
    if (ckr_reserve(c, 1) < 0) return -1;
    c->p[c->len++] = V_NULL;
    return 0;
}

static int ckr_num(chunk_t *c, char tag, const void *v8) {
    if (ckr_reserve(c, 9) < 0) return -1;
    c->p[c->len++] = tag;
    memcpy(c->p + c->len, v8, 8);
    c->len += 8;
    return 0;
}

static int ckr_bytes(chunk_t *c, char tag, const void *p, size_t n) {
    if (n > INT32_MAX || ckr_reserve(c, 5 + n) < 0) return -1;
    uint32_t m = (uint32_t)n;
    c->p[c->len++] = tag;
    memcpy(c->p + c->len, &m, 4);
    if (n) memcpy(c->p + c->len + 4, p, n);
    c->len += 4 + n;
    return 0;
}

/* the same on the calling thread (GIL held): a Python exception on failure */
static int ck_fail(void) {
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_MemoryError, "out of memory, or a value of 2 GiB or more");
    return -1;
}
static int ck_null(chunk_t *c) { return ckr_null(c) < 0 ? ck_fail() : 0; }
static int ck_int(chunk_t *c, long long v) { return ckr_num(c, V_INT, &v) < 0 ? ck_fail() : 0; }
static int ck_real(chunk_t *c, double v) { return ckr_num(c, V_REAL, &v) < 0 ? ck_fail() : 0; }
static int ck_bytes(chunk_t *c, char tag, const char *p, Py_ssize_t n) {
    return n < 0 || ckr_bytes(c, tag, p, (size_t)n) < 0 ? ck_fail() : 0;
}

/* -- a bounded queue of chunks between a thread of ours and the calling thread ---------
 * Every chq_* function is free of Python: the calling thread calls the waiting ones with
 * the GIL released. Either side may stop the queue (chq_fail with a message, or
 * chq_stop); the producer ends it with chq_close. */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    chunk_t q[QDEPTH];
    int head, count, done, stop, failed;
    char err[512];
} chq_t;

static void chq_init(chq_t *Q) {
    memset(Q, 0, sizeof *Q);
    pthread_mutex_init(&Q->mu, NULL);
    pthread_cond_init(&Q->cv, NULL);
}

/* frees what still waits; the threads are joined */
static void chq_destroy(chq_t *Q) {
    for (int i = 0; i < Q->count; i++) free(Q->q[(Q->head + i) % QDEPTH].p);
    Q->count = 0;
    pthread_mutex_destroy(&Q->mu);
    pthread_cond_destroy(&Q->cv);
}

/* hand *ck over (waits while QDEPTH chunks wait); 0 ok, -1 stopped (*ck freed). *ck is
 * reset either way */
static int chq_push(chq_t *Q, chunk_t *ck) {
    pthread_mutex_lock(&Q->mu);
    while (Q->count == QDEPTH && !Q->stop) pthread_cond_wait(&Q->cv, &Q->mu);
    int stopped = Q->stop;
    if (!stopped) {
        Q->q[(Q->head + Q->count) % QDEPTH] = *ck;
        Q->count++;
        pthread_cond_broadcast(&Q->cv);
    }
    pthread_mutex_unlock(&Q->mu);
    if (stopped) free(ck->p);
    memset(ck, 0, sizeof *ck);
    return stopped ? -1 : 0;
}

/* the next chunk into *out (waits while none is there); 1 got one, 0 the producer is
 * done and everything was taken, or the queue was stopped */
static int chq_pop(chq_t *Q, chunk_t *out) {
    pthread_mutex_lock(&Q->mu);
    while (Q->count == 0 && !Q->done && !Q->stop) pthread_cond_wait(&Q->cv, &Q->mu);
    int got = !Q->stop && Q->count > 0;
    if (got) {
        *out = Q->q[Q->head];
        Q->head = (Q->head + 1) % QDEPTH;
        Q->count--;
        pthread_cond_broadcast(&Q->cv);
    }
    pthread_mutex_unlock(&Q->mu);
    return got;
}

static void chq_end(chq_t *Q, int done, const char *msg) {
    pthread_mutex_lock(&Q->mu);
    if (done) {
        Q->done = 1;
    } else {
        Q->stop = 1;
        if (msg != NULL && !Q->failed) {
            Q->failed = 1;
            snprintf(Q->err, sizeof Q->err, "%s", msg);
        }
    }
    pthread_cond_broadcast(&Q->cv);
    pthread_mutex_unlock(&Q->mu);
}

static void chq_close(chq_t *Q) { chq_end(Q, 1, NULL); }
static void chq_stop(chq_t *Q) { chq_end(Q, 0, NULL); }
static void chq_fail(chq_t *Q, const char *msg) { chq_end(Q, 0, msg); }

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *st;
    int nvals;
    pthread_t thread;
    int started;
    chq_t Q;        /* the calling thread pushes, the inserter pops */
    u128 acc;       /* the digest texts the inserter hashed (read after the join) */
    char err[512];
} loader_t;

/* bind and step every row of the chunk; 0 ok, else SQLite's message in L->err */
static int insert_chunk(loader_t *L, const chunk_t *ck) {
    const char *p = ck->p;
    for (size_t r = 0; r < ck->rows; r++) {
        int rc = SQLITE_OK;
        for (int col = 1; col <= L->nvals; col++) {
            char tag = *p++;
            if (tag == V_NULL) {
                if (rc == SQLITE_OK) rc = sqlite3_bind_null(L->st, col);
            } else if (tag == V_INT || tag == V_REAL) {
                if (rc == SQLITE_OK && tag == V_INT) {
                    long long v;
                    memcpy(&v, p, 8);
                    rc = sqlite3_bind_int64(L->st, col, v);
                } else if (rc == SQLITE_OK) {
                    double v;
                    memcpy(&v, p, 8);
                    rc = sqlite3_bind_double(L->st, col, v);
                }
                p += 8;
            } else {
                uint32_t n;
                memcpy(&n, p, 4);
                p += 4;
                if (rc == SQLITE_OK)
                    rc = tag == V_TEXT
                        ? sqlite3_bind_text(L->st, col, p, (int)n, SQLITE_STATIC)
                        : sqlite3_bind_blob(L->st, col, p, (int)n, SQLITE_STATIC);
                p += n;
            }
        }
        if (rc == SQLITE_OK) {
            rc = sqlite3_step(L->st);
            if (rc == SQLITE_DONE) rc = SQLITE_OK;
        }
        sqlite3_reset(L->st);
        if (*p++ == V_HASH) { /* the row's digest text: hashed here, off the calling thread */
            uint32_t n;
            memcpy(&n, p, 4);
            L->acc += blake2b_128((const uint8_t *)p + 4, n);
            p += 4 + n;
        }
        if (rc != SQLITE_OK) {
            snprintf(L->err, sizeof L->err, "insert: %s", sqlite3_errmsg(L->db));
            return -1;
        }
    }
    return 0;
}

static void *inserter_main(void *arg) {
    loader_t *L = arg;
    chunk_t ck;
    while (chq_pop(&L->Q, &ck)) {
        int bad = insert_chunk(L, &ck) < 0;
        free(ck.p);
        if (bad) {
            chq_fail(&L->Q, L->err);
            break;
        }
    }
    return NULL;
}

/* hand the chunk to the inserter (waiting, without the GIL, while QDEPTH chunks wait);
 * -1 when the inserter has failed (SqliteError set) */
static int loader_push(loader_t *L, chunk_t *ck) {
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = chq_push(&L->Q, ck);
    Py_END_ALLOW_THREADS
    if (r < 0) PyErr_Format(SqliteError, "%s", L->Q.err);
    return r;
}

/* let the inserter drain (ok) or stop it; joined on return. -1 when it failed (SqliteError
 * set unless an error is already set) */
static int loader_finish(loader_t *L, int ok) {
    if (!L->started) return 0;
    Py_BEGIN_ALLOW_THREADS
    if (ok) chq_close(&L->Q);
    else chq_stop(&L->Q);
    pthread_join(L->thread, NULL);
    Py_END_ALLOW_THREADS
    L->started = 0;
    if (L->Q.failed) {
        if (!PyErr_Occurred()) PyErr_Format(SqliteError, "%s", L->Q.err);
        return -1;
    }
    return 0;
}

/* the raw-parsed row's values (the SQLite target's stored forms, see sqlite.py) */
static int ck_raw_row(chunk_t *ck, raw_ctx *c, const char *key, Py_ssize_t keyn,
                      const jv_t *version, const jv_t *ts, const tm_t *ts_tm,
                      const char *topic, Py_ssize_t topicn, long long part, long long off) {
    char buf[32];
    if (ck_bytes(ck, V_TEXT, key, keyn) < 0) return -1;
    for (Py_ssize_t i = 0; i < c->ncols; i++) {
        cv_t *x = &c->cv[i];
        int bad;
        if (x->type == 0) { bad = ck_null(ck); }
        else switch (c->kinds[i]) {
        case K_TEXT: bad = ck_bytes(ck, V_TEXT, (const char *)x->p, x->n); break;
        case K_TS: tm_format(&x->t, buf); bad = ck_bytes(ck, V_TEXT, buf, 27); break;
        case K_BIGINT: bad = ck_int(ck, x->i); break;
        case K_DOUBLE: bad = ck_real(ck, x->d); break;
        case K_BOOL: bad = ck_int(ck, x->type == J_TRUE); break;
        case K_JSONB: bad = ck_bytes(ck, V_TEXT, c->canon.p + x->jc, x->jcn); break;
        default: PyErr_SetString(PyExc_ValueError, "unknown column kind"); bad = -1;
        }
        if (bad < 0) return -1;
    }
    long long v = 0;
    if (version->type == J_INT) parse_int(version->p, version->n, &v);
    if ((version->type == J_INT ? ck_int(ck, v) : ck_null(ck)) < 0 ||
        ck_bytes(ck, V_TEXT, topic, topicn) < 0 || ck_int(ck, part) < 0 || ck_int(ck, off) < 0)
        return -1;
    if (ts->type == J_STR) {
        tm_format(ts_tm, buf);
        return ck_bytes(ck, V_TEXT, buf, 27);
    }
    return ck_null(ck);
}

/* a row of Python values as the sqlite3 module would bind them (None, int, float, str,
 * bytes) */
static int ck_py_row(chunk_t *ck, PyObject *row) {
    Py_ssize_t n = PyTuple_GET_SIZE(row);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(row, i);
        int bad;
        if (v == Py_None) {
            bad = ck_null(ck);
        } else if (PyLong_Check(v)) {
            int overflow;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow) {
                PyErr_SetString(PyExc_OverflowError,
                                "Python int too large to convert to SQLite INTEGER");
                return -1;
            }
            if (x == -1 && PyErr_Occurred()) return -1;
            bad = ck_int(ck, x);
        } else if (PyFloat_Check(v)) {
            bad = ck_real(ck, PyFloat_AS_DOUBLE(v));
        } else if (PyUnicode_Check(v)) {
            Py_ssize_t len;
            const char *u = PyUnicode_AsUTF8AndSize(v, &len);
            if (u == NULL) return -1;
            bad = ck_bytes(ck, V_TEXT, u, len);
        } else if (PyBytes_Check(v)) {
            bad = ck_bytes(ck, V_BLOB, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
        } else {
            PyErr_Format(PyExc_TypeError, "column %zd: type '%s' is not supported", i + 1,
                         Py_TYPE(v)->tp_name);
            return -1;
        }
        if (bad < 0) return -1;
    }
    return 0;
}

/* sqlite_load(path as bytes, create_sql, insert_sql, names, kinds, keys, changes of those
 * keys, parts, helpers, progress) -> (count, hi, lo) */
static PyObject *sqlite_load(PyObject *Py_UNUSED(self), PyObject *args) {
    const char *path, *create_sql, *insert_sql; /* path: bytes, the file system's encoding */
    PyObject *names, *kinds_t, *keys, *values, *parts, *helpers, *progress;
    if (!PyArg_ParseTuple(args, "yssO!O!O!O!O!O!O", &path, &create_sql, &insert_sql,
                          &PyTuple_Type, &names, &PyTuple_Type, &kinds_t, &PyList_Type, &keys,
                          &PyList_Type, &values, &PyList_Type, &parts, &PyTuple_Type,
                          &helpers, &progress))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(names);
    if (PyList_GET_SIZE(values) != PyList_GET_SIZE(keys)) {
        PyErr_SetString(PyExc_ValueError, "sqlite_load: one change per key");
        return NULL;
    }
    if (PyTuple_GET_SIZE(kinds_t) != ncols || PyTuple_GET_SIZE(helpers) != H_COUNT) {
        PyErr_SetString(PyExc_ValueError, "sqlite_load: bad spec");
        return NULL;
    }
    PyObject **h = &PyTuple_GET_ITEM(helpers, 0);
    int *kinds = PyMem_Malloc(sizeof(int) * (ncols ? ncols : 1));
    if (kinds == NULL) return PyErr_NoMemory();
    raw_ctx rc;
    int rc_ok = 0;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    u128 acc = 0;
    Py_ssize_t count = 0, pending = 0;
    loader_t L;
    memset(&L, 0, sizeof L);
    chq_init(&L.Q);
    chunk_t ck = {NULL, 0, 0, 0};
    if (parse_kinds(kinds_t, kinds, ncols) < 0) goto fail;
    if (raw_ctx_init(&rc, names, kinds, ncols) < 0) goto fail;
    rc_ok = 1;
    db = sq_open(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX);
    if (db == NULL) goto fail;
    if (sq_exec(db, "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
                    "PRAGMA cache_size=-200000") < 0 ||
        sq_exec(db, "BEGIN") < 0 || sq_exec(db, create_sql) < 0)
        goto fail;
    int prc = sqlite3_prepare_v2(db, insert_sql, -1, &st, NULL);
    if (prc != SQLITE_OK) { sq_error(db, prc, "prepare"); goto fail; }
    if (sqlite3_bind_parameter_count(st) != ncols + 6) {
        PyErr_SetString(PyExc_ValueError, "sqlite_load: the insert takes every column");
        goto fail;
    }
    L.db = db;
    L.st = st;
    L.nvals = (int)ncols + 6;
    if (pthread_create(&L.thread, NULL, inserter_main, &L) != 0) {
        PyErr_SetString(PyExc_OSError, "sqlite_load: cannot start the inserter thread");
        goto fail;
    }
    L.started = 1;
    Py_ssize_t nkeys = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *value, *topic, *partition, *offset;
        int live = change_fields(values, i, parts, "sqlite_load", &value, &topic, &partition,
                                 &offset);
        if (live < 0) goto fail;
        if (live == 0) continue; /* a tombstone */
        int r = 0;
        jv_t version, ts;
        tm_t ts_tm;
        if (rc.raw && PyBytes_CheckExact(value) && PyUnicode_CheckExact(key) &&
            PyUnicode_CheckExact(topic)) {
            r = raw_parse(&rc, (const unsigned char *)PyBytes_AS_STRING(value),
                          PyBytes_GET_SIZE(value), &version, &ts, &ts_tm, h);
            if (r < 0) goto fail;
        }
        size_t mark = ck.len;
        if (r == 1) {
            Py_ssize_t keyn, topicn;
            const char *k = PyUnicode_AsUTF8AndSize(key, &keyn);
            const char *t = k ? PyUnicode_AsUTF8AndSize(topic, &topicn) : NULL;
            long long pa = PyLong_AsLongLong(partition), of = PyLong_AsLongLong(offset);
            if (t == NULL || PyErr_Occurred()) goto fail;
            if (raw_digest_text(&rc, k, keyn, h) < 0 ||
                ck_raw_row(&ck, &rc, k, keyn, &version, &ts, &ts_tm, t, topicn, pa, of) < 0 ||
                ck_bytes(&ck, V_HASH, rc.dg.p, rc.dg.len) < 0) {
                ck.len = mark;
                goto fail;
            }
        } else {
            PyObject *row, *canon;
            if (object_row(key, value, topic, partition, offset, names, kinds, ncols, T_SQLITE,
                           h, &row, &canon) < 0)
                goto fail;
            int bad = digest_add(canon, h, &acc) < 0 || ck_py_row(&ck, row) < 0 ||
                      ck_null(&ck) < 0; /* hashed already */
            Py_DECREF(row);
            Py_DECREF(canon);
            if (bad) { ck.len = mark; goto fail; }
        }
        ck.rows++;
        count++;
        if (ck.rows == CHUNK_ROWS && loader_push(&L, &ck) < 0) goto fail;
        if (++pending == 10000 && progress != Py_None) {
            PyObject *res = PyObject_CallFunction(progress, "n", pending);
            if (res == NULL) goto fail;
            Py_DECREF(res);
            pending = 0;
        }
    }
    if (ck.rows && loader_push(&L, &ck) < 0) goto fail;
    if (loader_finish(&L, 1) < 0) goto fail;
    acc += L.acc;
    sqlite3_finalize(st);
    st = NULL;
    if (sq_exec(db, "COMMIT") < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    sqlite3_close(db);
    Py_END_ALLOW_THREADS
    db = NULL;
    if (pending && progress != Py_None) {
        PyObject *res = PyObject_CallFunction(progress, "n", pending);
        if (res == NULL) goto fail;
        Py_DECREF(res);
    }
    chq_destroy(&L.Q);
    raw_ctx_free(&rc);
    PyMem_Free(kinds);
    return sum_result(count, acc, NULL);
fail:
    loader_finish(&L, 0); /* keeps the error already set */
    free(ck.p);
    chq_destroy(&L.Q);
    sqlite3_finalize(st);
    if (db != NULL) sqlite3_close(db); /* an open transaction is rolled back */
    if (rc_ok) raw_ctx_free(&rc);
    PyMem_Free(kinds);
    return NULL;
}

/* -- the reader: SQLite on a thread of its own, the digest on the calling thread --------
 *
 * The reader thread (no Python) steps the query and copies each row's column values into
 * chunks (the loader's value format); the calling thread takes the chunks (waiting without
 * the GIL) and digests their rows, natively or, for values the native digest does not
 * take, through the Python values the sqlite3 module would give. */

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *st;
    int ncol;
    pthread_t thread;
    int started;
    chq_t Q;        /* the reader pushes, the calling thread pops */
} reader_t;

static void *reader_main(void *arg) {
    reader_t *R = arg;
    chunk_t ck = {NULL, 0, 0, 0};
    char msg[512];
    for (;;) {
        int rc = sqlite3_step(R->st);
        if (rc == SQLITE_DONE) break;
        if (rc != SQLITE_ROW) {
            snprintf(msg, sizeof msg, "read: %s", sqlite3_errmsg(R->db));
            goto fail;
        }
        for (int i = 0; i < R->ncol; i++) {
            int bad;
            switch (sqlite3_column_type(R->st, i)) {
            case SQLITE_INTEGER: {
                long long v = sqlite3_column_int64(R->st, i);
                bad = ckr_num(&ck, V_INT, &v);
                break;
            }
            case SQLITE_FLOAT: {
                double v = sqlite3_column_double(R->st, i);
                bad = ckr_num(&ck, V_REAL, &v);
                break;
            }
            case SQLITE_TEXT: {
                const unsigned char *t = sqlite3_column_text(R->st, i);
                bad = t == NULL ? -1 : ckr_bytes(&ck, V_TEXT, t,
                                                 (size_t)sqlite3_column_bytes(R->st, i));
                break;
            }
            case SQLITE_BLOB: {
                int n = sqlite3_column_bytes(R->st, i);
                const void *b = sqlite3_column_blob(R->st, i);
                bad = n && b == NULL ? -1 : ckr_bytes(&ck, V_BLOB, b, (size_t)n);
                break;
            }
            default: bad = ckr_null(&ck);
            }
            if (bad) {
                snprintf(msg, sizeof msg, "read: out of memory");
                goto fail;
            }
        }
        if (++ck.rows == CHUNK_ROWS && chq_push(&R->Q, &ck) < 0) return NULL;
    }
    if (ck.rows && chq_push(&R->Q, &ck) < 0) return NULL;
    chq_close(&R->Q);
    return NULL;
fail:
    free(ck.p);
    chq_fail(&R->Q, msg);
    return NULL;
}

/* one column value of a chunk row */
typedef struct {
    char tag;                 /* V_* */
    const unsigned char *p;   /* V_TEXT, V_BLOB */
    Py_ssize_t n;
    long long i;              /* V_INT */
    double d;                 /* V_REAL */
} sv_t;

/* decode the row at *pp into v[0:n]; *pp moves past it */
static void sv_row(const char **pp, sv_t *v, int n) {
    const char *p = *pp;
    for (int i = 0; i < n; i++) {
        v[i].tag = *p++;
        if (v[i].tag == V_INT) { memcpy(&v[i].i, p, 8); p += 8; }
        else if (v[i].tag == V_REAL) { memcpy(&v[i].d, p, 8); p += 8; }
        else if (v[i].tag == V_TEXT || v[i].tag == V_BLOB) {
            uint32_t m;
            memcpy(&m, p, 4);
            v[i].p = (const unsigned char *)p + 4;
            v[i].n = m;
            p += 4 + m;
        }
    }
    *pp = p;
}

/* the row as the sqlite3 module gives it (a tuple of Python values) */
static PyObject *sv_row_tuple(const sv_t *v, int n) {
    PyObject *row = PyTuple_New(n);
    if (row == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *o;
        switch (v[i].tag) {
        case V_INT: o = PyLong_FromLongLong(v[i].i); break;
        case V_REAL: o = PyFloat_FromDouble(v[i].d); break;
        case V_TEXT: o = PyUnicode_DecodeUTF8((const char *)v[i].p, v[i].n, NULL); break;
        case V_BLOB: o = PyBytes_FromStringAndSize((const char *)v[i].p, v[i].n); break;
        default: o = Py_NewRef(Py_None);
        }
        if (o == NULL) { Py_DECREF(row); return NULL; }
        PyTuple_SET_ITEM(row, i, o);
    }
    return row;
}

/* the digest text of the row, natively: 1 added, 0 use the Python values, -1 error */
static int sv_row_digest(const sv_t *v, const int *kinds, int nf, buf_t *dg,
                         buf_t *scratch, PyObject **h, u128 *acc) {
    dg->len = 0;
    if (buf_put(dg, "[", 1) < 0) return -1;
    for (int i = 0; i < nf; i++) {
        if (i && buf_put(dg, ",", 1) < 0) return -1;
        int tag = v[i].tag, kind = i == 0 ? K_TEXT : kinds[i - 1];
        int bad = 0;
        if (tag == V_NULL && i) {
            bad = buf_put(dg, "null", 4) < 0;
        } else if (tag == V_TEXT && (kind == K_TEXT || kind == K_TS || kind == K_JSONB)) {
            const unsigned char *p = v[i].p;
            Py_ssize_t n = v[i].n;
            if (!utf8_valid(p, n)) return 0;
            if (kind == K_TEXT) {
                bad = dj_str(dg, p, n) < 0;
            } else if (kind == K_TS) {
                tm_t t;
                if (!parse_ts_bytes((const char *)p, n, &t)) return 0;
                bad = dj_int(dg, tm_micros(&t)) < 0;
            } else {
                scratch->len = 0;
                bad = canon_json(p, n, scratch, h, 0, NULL) < 0 ||
                      dj_str(dg, (const unsigned char *)scratch->p, scratch->len) < 0;
            }
        } else if (tag == V_INT && kind == K_BIGINT) {
            bad = dj_int(dg, v[i].i) < 0;
        } else if (tag == V_INT && kind == K_BOOL) {
            bad = v[i].i ? buf_put(dg, "true", 4) < 0 : buf_put(dg, "false", 5) < 0;
        } else if (tag == V_REAL && kind == K_DOUBLE && isfinite(v[i].d)) {
            bad = dj_double(dg, v[i].d, h) < 0;
        } else {
            return 0;
        }
        if (bad) return -1;
    }
    if (buf_put(dg, "]", 1) < 0) return -1;
    *acc += blake2b_128((const uint8_t *)dg->p, (size_t)dg->len);
    return 1;
}

/* stop the reader (unless it ended) and join it */
static void reader_join(reader_t *R) {
    if (!R->started) return;
    Py_BEGIN_ALLOW_THREADS
    chq_stop(&R->Q);
    pthread_join(R->thread, NULL);
    Py_END_ALLOW_THREADS
    R->started = 0;
}

/* sqlite_digest(path as bytes, select_sql, kinds, helpers) -> (count, hi, lo); select_sql
 * gives (key, data columns) */
static PyObject *sqlite_digest(PyObject *Py_UNUSED(self), PyObject *args) {
    const char *path, *select_sql;
    PyObject *kinds_t, *helpers;
    if (!PyArg_ParseTuple(args, "ysO!O!", &path, &select_sql, &PyTuple_Type, &kinds_t,
                          &PyTuple_Type, &helpers))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(kinds_t);
    if (PyTuple_GET_SIZE(helpers) != H_COUNT) {
        PyErr_SetString(PyExc_ValueError, "sqlite_digest: bad helpers");
        return NULL;
    }
    PyObject **h = &PyTuple_GET_ITEM(helpers, 0);
    int nf = (int)ncols + 1;
    int *kinds = PyMem_Malloc(sizeof(int) * (ncols ? ncols : 1));
    sv_t *vals = PyMem_Malloc(sizeof(sv_t) * nf);
    if (kinds == NULL || vals == NULL) {
        PyMem_Free(kinds);
        PyMem_Free(vals);
        return PyErr_NoMemory();
    }
    reader_t R;
    memset(&R, 0, sizeof R);
    chq_init(&R.Q);
    buf_t dg = {NULL, 0, 0}, scratch = {NULL, 0, 0};
    u128 acc = 0;
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    chunk_t ck = {NULL, 0, 0, 0};
    if (parse_kinds(kinds_t, kinds, ncols) < 0) goto out;
    R.db = sq_open(path, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX);
    if (R.db == NULL) goto out;
    int prc = sqlite3_prepare_v2(R.db, select_sql, -1, &R.st, NULL);
    if (prc != SQLITE_OK) { sq_error(R.db, prc, "prepare"); goto out; }
    if (sqlite3_column_count(R.st) != nf) {
        PyErr_SetString(PyExc_ValueError, "sqlite_digest: the query gives key and data columns");
        goto out;
    }
    R.ncol = nf;
    if (pthread_create(&R.thread, NULL, reader_main, &R) != 0) {
        PyErr_SetString(PyExc_OSError, "sqlite_digest: cannot start the reader thread");
        goto out;
    }
    R.started = 1;
    for (;;) {
        int got;
        Py_BEGIN_ALLOW_THREADS /* the event loop thread runs meanwhile */
        got = chq_pop(&R.Q, &ck);
        Py_END_ALLOW_THREADS
        if (!got) break;
        const char *p = ck.p;
        for (size_t r = 0; r < ck.rows; r++) {
            sv_row(&p, vals, nf);
            int nr = sv_row_digest(vals, kinds, nf, &dg, &scratch, h, &acc);
            if (nr < 0) goto out;
            if (nr == 0) {
                PyObject *row = sv_row_tuple(vals, nf);
                if (row == NULL) goto out;
                int bad = py_row_digest(kinds, ncols, T_SQLITE, row, &dg, &scratch, h, &acc) < 0;
                Py_DECREF(row);
                if (bad) goto out;
            }
            count++;
        }
        free(ck.p);
        memset(&ck, 0, sizeof ck);
    }
    reader_join(&R);
    if (R.Q.failed) {
        PyErr_Format(SqliteError, "%s", R.Q.err);
        goto out;
    }
    result = sum_result(count, acc, NULL);
out:
    reader_join(&R); /* after an error: stops it */
    free(ck.p);
    chq_destroy(&R.Q);
    sqlite3_finalize(R.st);
    if (R.db != NULL) {
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close(R.db);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(dg.p);
    PyMem_Free(scratch.p);
    PyMem_Free(vals);
    PyMem_Free(kinds);
    return result;
}
