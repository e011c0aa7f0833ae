"""Access to the compiled kernel library `omni_edge._C`, with a clear error when it is missing."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def lib():
    """The `omni_edge._C` module. Raises ImportError with a fix if the package was not built."""
    try:
        from omni_edge import _C
    except ImportError as e:  # pragma: no cover - depends on how the package was installed
        raise ImportError(
            "omni_edge._C (the native kernels) is not built. Install the package with "
            "`pip install .` (or `pip install -e . --no-build-isolation` when developing): " + str(e)
        ) from e
    from omni_edge import knobs

    _C.set_isa_cap(knobs.settings().isa or "avx512")  # OMNI_EDGE_ISA, read once in omni_edge.knobs
    knobs._apply_threads(knobs.settings())  # OMNI_EDGE_THREADS: the size of the native kernels' CPU pool
    return _C


def available() -> bool:
    try:
        lib()
    except ImportError:
        return False
    return True
