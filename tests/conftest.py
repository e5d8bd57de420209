"""Test-wide setup: 8 fake CPU devices (set before JAX initialises), no Ray auth token, the
freed heap handed back to the OS after each test, and JAX's compiled executables dropped after
each module."""

import ctypes
import ctypes.util
import gc
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Step costs timed on a machine busy with tests are not the machine's: keep them out of the
# cache that users' engines read (`pipeline.tree_costs`).
os.environ["SPECDRAFT_STEP_COSTS"] = tempfile.mkdtemp(prefix="specdraft-step-costs-")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()


def _malloc_trim():
    """glibc's malloc_trim, or None off glibc."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """Each SmolLM2 engine on the 8 fake devices holds 8 copies of its weights (4.3 GB). Freed,
    they stay in glibc's per-thread arenas: the full suite grew to 16 GB in one process, 6.3 GB
    with malloc_trim after each test."""
    yield
    if _TRIM is not None:
        gc.collect()
        _TRIM(0)


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_executables():
    """Each executable XLA:CPU compiles keeps about 15 memory mappings (LLVM's JIT sections) for as
    long as a cache holds it. The whole suite compiles thousands, and in one process it reached the
    kernel's limit (`vm.max_map_count`, 65530): the next compilation's mmap failed and LLVM aborted
    (`RuntimeDyldImpl::emitSection` -> `report_fatal_error`, a core with 65531 mappings), late in
    the run and in whichever test compiled then. Module-scoped fixtures keep their executables
    within a module; after it, nothing needs them."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
