"""The top level of `pmu`: which failures are told as running out of memory."""

from __future__ import annotations

import errno

from pmu.commands import _for_want_of_memory


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


def test_memory_errors_and_what_causes_them():
    dlopen = ImportError("libscipy_openblas64_.so: failed to map segment from shared object")
    assert _for_want_of_memory(MemoryError())
    assert _for_want_of_memory(dlopen)
    assert _for_want_of_memory(_chained(ImportError("Importing the numpy C-extensions failed."), dlopen))
    assert _for_want_of_memory(_chained(RuntimeError("x"), MemoryError()))
    assert _for_want_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))


def test_other_errors_are_not():
    assert not _for_want_of_memory(ImportError("No module named 'numpy'"))
    assert not _for_want_of_memory(OSError(errno.ENOENT, "No such file"))
    assert not _for_want_of_memory(_chained(ImportError("x"), ValueError("y")))
