/* Native bulk insert into a SQLite file for the restore's SQLite target (sqlite.py).
 *
 * Loader(path): its own connection to the restore's scratch file (journal off, no syncs:
 * the file is scratch until the target fsyncs and renames it).
 *   execute(sql)        run statements (GIL released while SQLite works)
 *   prepare(sql)        the INSERT statement that insert() runs
 *   insert(rows)        rows: a list of tuples of str / int / float / bytes / None, one
 *                       value per placeholder. The values are read under the GIL (UTF-8 of
 *                       each str), then every row is bound and stepped with the GIL
 *                       released, so the next chunk can be converted meanwhile. Returns
 *                       the rows inserted; a SQLite error raises sqlite_error with
 *                       SQLite's message and the row's position in the chunk.
 *   close()             idempotent; also on deallocation.
 *
 * Invariants: one thread uses a Loader at a time (the target's insert thread); the list and
 * its tuples are kept alive (a reference to the list) while the GIL is released; nothing is
 * bound from memory the Python side could change (str and bytes are immutable, their UTF-8
 * buffers are cached on the str object).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>

static PyObject *SqliteError;

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *stmt;
    int ncols;
} Loader;

enum { V_NULL, V_INT, V_DOUBLE, V_TEXT, V_BLOB };

typedef struct {
    int type;
    Py_ssize_t len;
    union {
        sqlite3_int64 i;
        double d;
        const char *p;
    } u;
} Val;

static PyObject *raise_db(Loader *self, const char *what, int rc) {
    const char *msg = self->db ? sqlite3_errmsg(self->db) : sqlite3_errstr(rc);
    PyErr_Format(SqliteError, "%s: %s", what, msg);
    return NULL;
}

static void loader_close_db(Loader *self) {
    if (self->stmt) {
        sqlite3_finalize(self->stmt);
        self->stmt = NULL;
    }
    if (self->db) {
        sqlite3_close_v2(self->db);
        self->db = NULL;
    }
}

static int Loader_init(Loader *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"path", NULL};
    PyObject *path_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&", kwlist, PyUnicode_FSConverter,
                                     &path_obj))
        return -1;
    loader_close_db(self);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_open_v2(PyBytes_AS_STRING(path_obj), &self->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(self->db,
                          "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
                          "PRAGMA cache_size=-200000",
                          NULL, NULL, NULL);
    Py_END_ALLOW_THREADS
    Py_DECREF(path_obj);
    if (rc != SQLITE_OK) {
        raise_db(self, "open", rc);
        loader_close_db(self);
        return -1;
    }
    return 0;
}

static void Loader_dealloc(Loader *self) {
    loader_close_db(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int need_open(Loader *self) {
    if (self->db == NULL) {
        PyErr_SetString(SqliteError, "the loader is closed");
        return -1;
    }
    return 0;
}

static PyObject *Loader_execute(Loader *self, PyObject *arg) {
    if (need_open(self) < 0) return NULL;
    const char *sql = PyUnicode_AsUTF8(arg);
    if (sql == NULL) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_exec(self->db, sql, NULL, NULL, NULL);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) return raise_db(self, "execute", rc);
    Py_RETURN_NONE;
}

static PyObject *Loader_prepare(Loader *self, PyObject *arg) {
    if (need_open(self) < 0) return NULL;
    Py_ssize_t n;
    const char *sql = PyUnicode_AsUTF8AndSize(arg, &n);
    if (sql == NULL) return NULL;
    if (self->stmt) {
        sqlite3_finalize(self->stmt);
        self->stmt = NULL;
    }
    int rc = sqlite3_prepare_v2(self->db, sql, (int)n, &self->stmt, NULL);
    if (rc != SQLITE_OK) return raise_db(self, "prepare", rc);
    self->ncols = sqlite3_bind_parameter_count(self->stmt);
    Py_RETURN_NONE;
}

/* one Python value -> a Val; 0 ok, -1 error (exception set) */
static int read_value(PyObject *v, Val *out) {
    if (v == Py_None) {
        out->type = V_NULL;
    } else if (PyUnicode_CheckExact(v)) {
        out->u.p = PyUnicode_AsUTF8AndSize(v, &out->len);
        if (out->u.p == NULL) return -1;
        out->type = V_TEXT;
    } else if (PyLong_Check(v)) {  /* bool is an int: 0/1, as the sqlite3 module binds it */
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to SQLite INTEGER");
            return -1;
        }
        if (x == -1 && PyErr_Occurred()) return -1;
        out->type = V_INT;
        out->u.i = x;
    } else if (PyFloat_Check(v)) {
        out->type = V_DOUBLE;
        out->u.d = PyFloat_AS_DOUBLE(v);
    } else if (PyBytes_CheckExact(v)) {
        out->type = V_BLOB;
        out->u.p = PyBytes_AS_STRING(v);
        out->len = PyBytes_GET_SIZE(v);
    } else {
        PyErr_Format(PyExc_TypeError, "unsupported value type for SQLite: %.80s",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    return 0;
}

static int bind_value(sqlite3_stmt *st, int i, const Val *v) {
    switch (v->type) {
    case V_NULL: return sqlite3_bind_null(st, i);
    case V_INT: return sqlite3_bind_int64(st, i, v->u.i);
    case V_DOUBLE: return sqlite3_bind_double(st, i, v->u.d);
    case V_TEXT: return sqlite3_bind_text64(st, i, v->u.p, (sqlite3_uint64)v->len,
                                            SQLITE_STATIC, SQLITE_UTF8);
    default: return sqlite3_bind_blob64(st, i, v->u.p, (sqlite3_uint64)v->len, SQLITE_STATIC);
    }
}

static PyObject *Loader_insert(Loader *self, PyObject *rows) {
    if (need_open(self) < 0) return NULL;
    if (self->stmt == NULL) {
        PyErr_SetString(SqliteError, "insert before prepare");
        return NULL;
    }
    if (!PyList_CheckExact(rows)) {
        PyErr_SetString(PyExc_TypeError, "insert: rows must be a list");
        return NULL;
    }
    Py_ssize_t nrows = PyList_GET_SIZE(rows);
    int ncols = self->ncols;
    if (nrows == 0) return PyLong_FromLong(0);
    Val *vals = PyMem_Malloc(sizeof(Val) * (size_t)nrows * (size_t)(ncols ? ncols : 1));
    if (vals == NULL) return PyErr_NoMemory();
    Py_INCREF(rows);  /* keeps every tuple and value alive while the GIL is released */
    for (Py_ssize_t r = 0; r < nrows; r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != ncols) {
            PyErr_Format(PyExc_ValueError, "insert: row %zd is not a tuple of %d values", r,
                         ncols);
            goto fail;
        }
        for (int c = 0; c < ncols; c++)
            if (read_value(PyTuple_GET_ITEM(row, c), &vals[r * ncols + c]) < 0) goto fail;
    }
    sqlite3_stmt *st = self->stmt;
    int rc = SQLITE_OK;
    Py_ssize_t done = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; done < nrows; done++) {
        const Val *row = &vals[done * ncols];
        for (int c = 0; c < ncols; c++) {
            rc = bind_value(st, c + 1, &row[c]);
            if (rc != SQLITE_OK) break;
        }
        if (rc == SQLITE_OK) {
            rc = sqlite3_step(st);
            if (rc == SQLITE_DONE) rc = SQLITE_OK;
        }
        sqlite3_reset(st);
        if (rc != SQLITE_OK) break;
    }
    sqlite3_clear_bindings(st);
    Py_END_ALLOW_THREADS
    PyMem_Free(vals);
    Py_DECREF(rows);
    if (rc != SQLITE_OK) {
        PyErr_Format(SqliteError, "insert (row %zd of the chunk): %s", done,
                     sqlite3_errmsg(self->db));
        return NULL;
    }
    return PyLong_FromSsize_t(done);
fail:
    PyMem_Free(vals);
    Py_DECREF(rows);
    return NULL;
}

static PyObject *Loader_close(Loader *self, PyObject *Py_UNUSED(ignored)) {
    Py_BEGIN_ALLOW_THREADS
    loader_close_db(self);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef Loader_methods[] = {
    {"execute", (PyCFunction)Loader_execute, METH_O, "Run SQL statements."},
    {"prepare", (PyCFunction)Loader_prepare, METH_O, "Prepare the INSERT statement."},
    {"insert", (PyCFunction)Loader_insert, METH_O,
     "Insert a list of row tuples with the prepared statement; returns the count."},
    {"close", (PyCFunction)Loader_close, METH_NOARGS, "Close the connection."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "replicator.targets._sqlbulk.Loader",
    .tp_basicsize = sizeof(Loader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bulk insert into a SQLite file through its own connection.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Loader_init,
    .tp_dealloc = (destructor)Loader_dealloc,
    .tp_methods = Loader_methods,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_sqlbulk",
    "Native bulk insert for the SQLite restore target.", -1, NULL,
};

PyMODINIT_FUNC PyInit__sqlbulk(void) {
    if (PyType_Ready(&LoaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    SqliteError = PyErr_NewException("replicator.targets._sqlbulk.sqlite_error", NULL, NULL);
    if (SqliteError == NULL || PyModule_AddObject(m, "sqlite_error", SqliteError) < 0) {
        Py_XDECREF(SqliteError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LoaderType);
    if (PyModule_AddObject(m, "Loader", (PyObject *)&LoaderType) < 0) {
        Py_DECREF(&LoaderType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddStringConstant(m, "sqlite_version", sqlite3_libversion());
    return m;
}
