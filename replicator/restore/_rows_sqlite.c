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
 * The GIL is let go every YIELD_ROWS rows, so the event
 * loop thread keeps running while a table loads.
 */
#include <sqlite3.h>

static PyObject *SqliteError;

enum { YIELD_ROWS = 256 };

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

/* one insert, with the GIL held (SQLite calls no Python here); the caller lets other
 * threads run every YIELD_ROWS rows instead of releasing the GIL per row */
static int sq_step_done(sqlite3 *db, sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) return sq_error(db, rc, "insert");
    return 0;
}

/* bind the raw-parsed row (the SQLite target's stored forms, see sqlite.py) */
static int sq_bind_raw(sqlite3 *db, sqlite3_stmt *st, raw_ctx *c, const char *key,
                       Py_ssize_t keyn, const jv_t *version, const jv_t *ts,
                       const tm_t *ts_tm, const char *topic, Py_ssize_t topicn,
                       long long part, long long off) {
    int col = 1, rc = sqlite3_bind_text(st, col++, key, (int)keyn, SQLITE_STATIC);
    char buf[32];
    for (Py_ssize_t i = 0; rc == SQLITE_OK && i < c->ncols; i++, col++) {
        cv_t *x = &c->cv[i];
        if (x->type == 0) { rc = sqlite3_bind_null(st, col); continue; }
        switch (c->kinds[i]) {
        case K_TEXT: rc = sqlite3_bind_text(st, col, (const char *)x->p, (int)x->n,
                                            SQLITE_STATIC); break;
        case K_TS: tm_format(&x->t, buf);
            rc = sqlite3_bind_text(st, col, buf, 27, SQLITE_TRANSIENT); break;
        case K_BIGINT: rc = sqlite3_bind_int64(st, col, x->i); break;
        case K_DOUBLE: rc = sqlite3_bind_double(st, col, x->d); break;
        case K_BOOL: rc = sqlite3_bind_int(st, col, x->type == J_TRUE); break;
        case K_JSONB: rc = sqlite3_bind_text(st, col, c->canon.p + x->jc, (int)x->jcn,
                                             SQLITE_STATIC); break;
        default: rc = SQLITE_MISUSE;
        }
    }
    if (rc == SQLITE_OK) {
        if (version->type == J_INT) {
            long long v;
            parse_int(version->p, version->n, &v);
            rc = sqlite3_bind_int64(st, col++, v);
        } else {
            rc = sqlite3_bind_null(st, col++);
        }
    }
    if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, col++, topic, (int)topicn, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, col++, part);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, col++, off);
    if (rc == SQLITE_OK) {
        if (ts->type == J_STR) {
            tm_format(ts_tm, buf);
            rc = sqlite3_bind_text(st, col, buf, 27, SQLITE_TRANSIENT);
        } else {
            rc = sqlite3_bind_null(st, col);
        }
    }
    return rc == SQLITE_OK ? 0 : sq_error(db, rc, "bind");
}

/* bind a row of Python values as the sqlite3 module would (None, int, float, str, bytes) */
static int sq_bind_py(sqlite3 *db, sqlite3_stmt *st, PyObject *row) {
    Py_ssize_t n = PyTuple_GET_SIZE(row);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(row, i);
        int rc, col = (int)i + 1;
        if (v == Py_None) {
            rc = sqlite3_bind_null(st, col);
        } else if (PyLong_Check(v)) {
            int overflow;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow) {
                PyErr_SetString(PyExc_OverflowError,
                                "Python int too large to convert to SQLite INTEGER");
                return -1;
            }
            if (x == -1 && PyErr_Occurred()) return -1;
            rc = sqlite3_bind_int64(st, col, x);
        } else if (PyFloat_Check(v)) {
            rc = sqlite3_bind_double(st, col, PyFloat_AS_DOUBLE(v));
        } else if (PyUnicode_Check(v)) {
            Py_ssize_t len;
            const char *u = PyUnicode_AsUTF8AndSize(v, &len);
            if (u == NULL) return -1;
            rc = sqlite3_bind_text64(st, col, u, (sqlite3_uint64)len, SQLITE_TRANSIENT,
                                     SQLITE_UTF8);
        } else if (PyBytes_Check(v)) {
            rc = sqlite3_bind_blob64(st, col, PyBytes_AS_STRING(v),
                                     (sqlite3_uint64)PyBytes_GET_SIZE(v), SQLITE_TRANSIENT);
        } else {
            PyErr_Format(PyExc_TypeError, "column %d: type '%s' is not supported", col,
                         Py_TYPE(v)->tp_name);
            return -1;
        }
        if (rc != SQLITE_OK) return sq_error(db, rc, "bind");
    }
    return 0;
}

/* sqlite_load(path, create_sql, insert_sql, names, kinds, keys, changes, parts, helpers,
 * progress) -> (count, hi, lo) */
static PyObject *sqlite_load(PyObject *Py_UNUSED(self), PyObject *args) {
    const char *path, *create_sql, *insert_sql;
    PyObject *names, *kinds_t, *keys, *changes, *parts, *helpers, *progress;
    if (!PyArg_ParseTuple(args, "sssO!O!O!O!O!O!O", &path, &create_sql, &insert_sql,
                          &PyTuple_Type, &names, &PyTuple_Type, &kinds_t, &PyList_Type, &keys,
                          &PyDict_Type, &changes, &PyList_Type, &parts, &PyTuple_Type,
                          &helpers, &progress))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(names);
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
    Py_ssize_t nkeys = PyList_GET_SIZE(keys);
    PyObject *next = nkeys ? PyDict_GetItemWithError(changes, PyList_GET_ITEM(keys, 0)) : NULL;
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *ch = next; /* looked up one row ahead (borrowed: the dict is not changed) */
        if (ch == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
            goto fail;
        }
        if (!PyTuple_Check(ch) || PyTuple_GET_SIZE(ch) < 5) {
            PyErr_SetString(PyExc_TypeError, "sqlite_load: a change is a tuple");
            goto fail;
        }
        next = NULL;
        if (i + 1 < nkeys) { /* the next event's first bytes while this one is parsed */
            next = PyDict_GetItemWithError(changes, PyList_GET_ITEM(keys, i + 1));
            if (next == NULL && PyErr_Occurred()) goto fail;
            if (next != NULL && PyTuple_Check(next) && PyTuple_GET_SIZE(next) >= 5 &&
                PyBytes_CheckExact(PyTuple_GET_ITEM(next, 4))) {
                const char *d = PyBytes_AS_STRING(PyTuple_GET_ITEM(next, 4));
                __builtin_prefetch(d);
                __builtin_prefetch(d + 64);
                __builtin_prefetch(d + 128);
            }
        }
        if (i % YIELD_ROWS == YIELD_ROWS - 1) { /* let the event loop thread run */
            Py_BEGIN_ALLOW_THREADS
            Py_END_ALLOW_THREADS
        }
        PyObject *value = PyTuple_GET_ITEM(ch, 4);
        if (value == Py_None) continue; /* a tombstone */
        Py_ssize_t rank = PyLong_AsSsize_t(PyTuple_GET_ITEM(ch, 2));
        if (rank < 0 || rank >= PyList_GET_SIZE(parts)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "sqlite_load: rank");
            goto fail;
        }
        PyObject *part = PyList_GET_ITEM(parts, rank);
        PyObject *topic = PyTuple_GET_ITEM(part, 0), *partition = PyTuple_GET_ITEM(part, 1);
        PyObject *offset = PyTuple_GET_ITEM(ch, 3);
        int r = 0;
        jv_t version, ts;
        tm_t ts_tm;
        if (rc.raw && PyBytes_CheckExact(value) && PyUnicode_CheckExact(key) &&
            PyUnicode_CheckExact(topic)) {
            r = raw_parse(&rc, (const unsigned char *)PyBytes_AS_STRING(value),
                          PyBytes_GET_SIZE(value), &version, &ts, &ts_tm, h);
            if (r < 0) goto fail;
        }
        if (r == 1) {
            Py_ssize_t keyn, topicn;
            const char *k = PyUnicode_AsUTF8AndSize(key, &keyn);
            const char *t = k ? PyUnicode_AsUTF8AndSize(topic, &topicn) : NULL;
            long long pa = PyLong_AsLongLong(partition), of = PyLong_AsLongLong(offset);
            if (t == NULL || PyErr_Occurred()) goto fail;
            if (raw_digest(&rc, k, keyn, h, &acc) < 0 ||
                sq_bind_raw(db, st, &rc, k, keyn, &version, &ts, &ts_tm, t, topicn, pa, of) < 0)
                goto fail;
        } else {
            PyObject *row = NULL, *canon = NULL;
            int f = fast_row(key, value, topic, partition, offset, names, kinds, ncols,
                             T_SQLITE, h, &row, &canon);
            if (f < 0) goto fail;
            if (f == 0) {
                PyObject *res = PyObject_CallFunctionObjArgs(h[H_SLOW_ROW], key, value, topic,
                                                             partition, offset, NULL);
                if (res == NULL) goto fail;
                if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 ||
                    !PyTuple_Check(PyTuple_GET_ITEM(res, 0)) ||
                    PyTuple_GET_SIZE(PyTuple_GET_ITEM(res, 0)) != ncols + 6) {
                    Py_DECREF(res);
                    PyErr_SetString(PyExc_TypeError, "slow_row must return (row, canonical)");
                    goto fail;
                }
                row = Py_NewRef(PyTuple_GET_ITEM(res, 0));
                canon = Py_NewRef(PyTuple_GET_ITEM(res, 1));
                Py_DECREF(res);
            }
            int bad = digest_add(canon, h, &acc) < 0 || sq_bind_py(db, st, row) < 0;
            Py_DECREF(row);
            Py_DECREF(canon);
            if (bad) goto fail;
        }
        if (sq_step_done(db, st) < 0) goto fail;
        count++;
        if (++pending == 10000 && progress != Py_None) {
            PyObject *res = PyObject_CallFunction(progress, "n", pending);
            if (res == NULL) goto fail;
            Py_DECREF(res);
            pending = 0;
        }
    }
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
    raw_ctx_free(&rc);
    PyMem_Free(kinds);
    return sum_result(count, acc, NULL);
fail:
    sqlite3_finalize(st);
    if (db != NULL) sqlite3_close(db); /* an open transaction is rolled back */
    if (rc_ok) raw_ctx_free(&rc);
    PyMem_Free(kinds);
    return NULL;
}

/* one row of the result as the sqlite3 module gives it (a tuple of Python values) */
static PyObject *sq_row_tuple(sqlite3_stmt *st, int n) {
    PyObject *row = PyTuple_New(n);
    if (row == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v;
        switch (sqlite3_column_type(st, i)) {
        case SQLITE_INTEGER: v = PyLong_FromLongLong(sqlite3_column_int64(st, i)); break;
        case SQLITE_FLOAT: v = PyFloat_FromDouble(sqlite3_column_double(st, i)); break;
        case SQLITE_TEXT:
            v = PyUnicode_DecodeUTF8((const char *)sqlite3_column_text(st, i),
                                     sqlite3_column_bytes(st, i), NULL);
            break;
        case SQLITE_BLOB:
            v = PyBytes_FromStringAndSize(sqlite3_column_blob(st, i),
                                          sqlite3_column_bytes(st, i));
            break;
        default: v = Py_NewRef(Py_None);
        }
        if (v == NULL) { Py_DECREF(row); return NULL; }
        PyTuple_SET_ITEM(row, i, v);
    }
    return row;
}

/* the digest text of the current result row, natively: 1 added, 0 use the Python values,
 * -1 error */
static int sq_row_digest(sqlite3_stmt *st, const int *kinds, int nf, buf_t *dg,
                         buf_t *scratch, PyObject **h, u128 *acc) {
    dg->len = 0;
    if (buf_put(dg, "[", 1) < 0) return -1;
    for (int i = 0; i < nf; i++) {
        if (i && buf_put(dg, ",", 1) < 0) return -1;
        int type = sqlite3_column_type(st, i), kind = i == 0 ? K_TEXT : kinds[i - 1];
        int bad = 0;
        if (type == SQLITE_NULL && i) {
            bad = buf_put(dg, "null", 4) < 0;
        } else if (type == SQLITE_TEXT && (kind == K_TEXT || kind == K_TS || kind == K_JSONB)) {
            const unsigned char *p = sqlite3_column_text(st, i);
            Py_ssize_t n = sqlite3_column_bytes(st, i);
            if (p == NULL || !utf8_valid(p, n)) return 0;
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
        } else if (type == SQLITE_INTEGER && kind == K_BIGINT) {
            bad = dj_int(dg, sqlite3_column_int64(st, i)) < 0;
        } else if (type == SQLITE_INTEGER && kind == K_BOOL) {
            bad = sqlite3_column_int64(st, i) ? buf_put(dg, "true", 4) < 0
                                              : buf_put(dg, "false", 5) < 0;
        } else if (type == SQLITE_FLOAT && kind == K_DOUBLE &&
                   isfinite(sqlite3_column_double(st, i))) {
            bad = dj_double(dg, sqlite3_column_double(st, i), h) < 0;
        } else {
            return 0;
        }
        if (bad) return -1;
    }
    if (buf_put(dg, "]", 1) < 0) return -1;
    *acc += blake2b_128((const uint8_t *)dg->p, (size_t)dg->len);
    return 1;
}

/* sqlite_digest(path, select_sql, kinds, helpers) -> (count, hi, lo); select_sql gives
 * (key, data columns) */
static PyObject *sqlite_digest(PyObject *Py_UNUSED(self), PyObject *args) {
    const char *path, *select_sql;
    PyObject *kinds_t, *helpers;
    if (!PyArg_ParseTuple(args, "ssO!O!", &path, &select_sql, &PyTuple_Type, &kinds_t,
                          &PyTuple_Type, &helpers))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(kinds_t);
    if (PyTuple_GET_SIZE(helpers) != H_COUNT) {
        PyErr_SetString(PyExc_ValueError, "sqlite_digest: bad helpers");
        return NULL;
    }
    PyObject **h = &PyTuple_GET_ITEM(helpers, 0);
    int *kinds = PyMem_Malloc(sizeof(int) * (ncols ? ncols : 1));
    if (kinds == NULL) return PyErr_NoMemory();
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    buf_t dg = {NULL, 0, 0}, scratch = {NULL, 0, 0};
    u128 acc = 0;
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    if (parse_kinds(kinds_t, kinds, ncols) < 0) goto out;
    db = sq_open(path, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX);
    if (db == NULL) goto out;
    int prc = sqlite3_prepare_v2(db, select_sql, -1, &st, NULL);
    if (prc != SQLITE_OK) { sq_error(db, prc, "prepare"); goto out; }
    if (sqlite3_column_count(st) != ncols + 1) {
        PyErr_SetString(PyExc_ValueError, "sqlite_digest: the query gives key and data columns");
        goto out;
    }
    for (;;) {
        if (count % YIELD_ROWS == YIELD_ROWS - 1) { /* let the event loop thread run */
            Py_BEGIN_ALLOW_THREADS
            Py_END_ALLOW_THREADS
        }
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE) break;
        if (rc != SQLITE_ROW) { sq_error(db, rc, "read"); goto out; }
        int nr = sq_row_digest(st, kinds, (int)ncols + 1, &dg, &scratch, h, &acc);
        if (nr < 0) goto out;
        if (nr == 0) {
            PyObject *row = sq_row_tuple(st, (int)ncols + 1);
            if (row == NULL) goto out;
            int bad = py_row_digest(kinds, ncols, T_SQLITE, row, &dg, &scratch, h, &acc) < 0;
            Py_DECREF(row);
            if (bad) goto out;
        }
        count++;
    }
    result = sum_result(count, acc, NULL);
out:
    sqlite3_finalize(st);
    if (db != NULL) {
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close(db);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(dg.p);
    PyMem_Free(scratch.p);
    PyMem_Free(kinds);
    return result;
}
