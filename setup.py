"""Build of the optional native restore code (``replicator.restore._fold``, ``_rows``); everything else is
declared in pyproject.toml. ``optional=True``: without a C compiler the install still
succeeds and the pure-Python reference fold is used (slower restores and compactions)."""

from setuptools import Extension, setup

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
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
