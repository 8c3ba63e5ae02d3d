"""Build of the optional native restore code (``replicator.restore._fold``, ``_rows``); everything else is
declared in pyproject.toml. ``optional=True``: without a C compiler the install still
succeeds and the pure-Python reference fold is used (slower restores and compactions)."""

import os
import sysconfig

from setuptools import Extension, setup


def _sqlite_headers() -> bool:
    """SQLite's C headers are there (Debian: libsqlite3-dev): ``_rows`` then also gets the
    native SQLite loader and read-back; without them the SQLite target uses the sqlite3
    module. ``REPLICATOR_NO_NATIVE_SQLITE=1`` builds without."""
    if os.environ.get("REPLICATOR_NO_NATIVE_SQLITE"):
        return False
    dirs = [sysconfig.get_config_var("INCLUDEDIR") or "", "/usr/include", "/usr/local/include"]
    return any(os.path.exists(os.path.join(d, "sqlite3.h")) for d in dirs if d)


_SQLITE = _sqlite_headers()

setup(
    ext_modules=[
        Extension(
            "replicator.restore._fold",
            sources=["replicator/restore/_fold.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "replicator.restore._rows",
            sources=["replicator/restore/_rows.c"],
            depends=["replicator/restore/_rows_sqlite.c"],
            define_macros=[("REPLICATOR_SQLITE", "1")] if _SQLITE else [],
            libraries=["sqlite3"] if _SQLITE else [],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
