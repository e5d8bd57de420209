"""A small-M fp32 matmul and a few-query attention for XLA:CPU (`small_matmul.cc`), built on
first use and called through the XLA FFI, with XLA's own ops as the fallback.

A decode step multiplies a handful of rows (one token, or a verify tree's nodes) by each weight
matrix. There the time is the weight read, and XLA:CPU's dot for 2-16 rows took about twice one
weight pass (README, Benchmarks). The kernel reads each packed weight once per call for any
number of rows, and gives every row the same bits whatever rows it is multiplied with.

`kernel_attention` is one layer's attention for a few new tokens (a decode step, a verify tree)
against the KV cache in one call, in place of about a dozen small XLA ops (SmolLM2, 9 tree
nodes, 2-core Xeon: 31.6 against 34.3 ms a forward; one token 23.2 against 24.5). A query's bits
depend only on the keys it sees, so a key counts the same from the cache or among the new tokens.

Weights are held packed (`PackedWeight`: `[N/32, K, 32]`, 32-column panels contiguous over
`K`) and `matmul` dispatches: up to `KERNEL_MAX_ROWS` rows through the kernel, more through XLA
on the same packed array (prefill, big batches). Packed weights are fp32, or bf16 (`pack(w,
jnp.bfloat16)`: half the bytes, widened exactly in the kernel; the engine's drafter head rows,
`EngineConfig.draft_head_dtype`). The kernel is compiled with the machine's C++
compiler (`-march=native`, plus `$SPECDRAFT_KERNEL_CXXFLAGS`) into
`~/.cache/specdraft/kernels/<hash>/`, keyed by the source, the compiler, the CPU, jaxlib and
those flags; without a compiler `available()` is False with the reason in
`unavailable_reason()`, and callers keep XLA's dot.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
PANEL = 32  # columns per packed panel: `NR` in small_matmul.cc
TARGET = "specdraft_small_matmul"
BF16_TARGET = "specdraft_small_matmul_bf16"  # bf16 weights, fp32 activations and sums
ATTENTION_TARGET = "specdraft_small_attention"
SOURCE = Path(__file__).with_name("small_matmul.cc")
# Rows (the product of x's leading dims) the kernel serves; more go to XLA. Decode steps and
# verify trees are far below; prefill is far above.
KERNEL_MAX_ROWS = 32


def _cache_root() -> Path:
    base = os.environ.get("SPECDRAFT_CACHE") or os.path.join(Path.home(), ".cache", "specdraft")
    return Path(base) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _extra_flags() -> list[str]:
    """`$SPECDRAFT_KERNEL_CXXFLAGS`, appended to the build's flags: e.g. `-mno-avx512f` builds
    the AVX2 variant on an AVX-512 machine (the tests check the narrower builds that way)."""
    return os.environ.get("SPECDRAFT_KERNEL_CXXFLAGS", "").split()


def _build(cxx: str) -> Path:
    import jaxlib

    include = jax.ffi.include_dir()
    flags = _extra_flags()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), _cpu_signature().encode(),
                 jaxlib.__version__.encode(), " ".join(flags).encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    out_dir = _cache_root() / key.hexdigest()[:16]
    lib = out_dir / "libsmall_matmul.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # One build per machine at a time (Ray workers start together); the others wait and reuse it.
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        cmd = [cxx, "-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared",
               "-fPIC", f"-I{include}", *flags, str(SOURCE), "-o", tmp]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr}")
        os.replace(tmp, lib)
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if jax.default_backend() != "cpu":
        return None, f"the default backend is {jax.default_backend()}, not the CPU"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler (g++ or $CXX) on PATH"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (RuntimeError, OSError) as err:
        return None, str(err)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SmallMatmul), platform="cpu")
    jax.ffi.register_ffi_target(BF16_TARGET, jax.ffi.pycapsule(lib.SmallMatmulBf16), platform="cpu")
    jax.ffi.register_ffi_target(
        ATTENTION_TARGET, jax.ffi.pycapsule(lib.SmallAttention), platform="cpu"
    )
    return lib, ""


def available() -> bool:
    """Whether the kernel is built (building it now if needed) and registered with XLA."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def _library() -> ctypes.CDLL:
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"small_matmul kernel unavailable: {unavailable_reason()}")
    return lib


def tile() -> tuple[int, int]:
    """(vector width in floats, register-tile rows) the build uses, from the compiled library."""
    code = _library().small_matmul_tile()
    return code // 1000, code % 1000


def attention_max_head_dim() -> int:
    """The largest head size (floats) the attention kernel serves, from the compiled library."""
    return _library().small_attention_max_head_dim()


def pack(w, dtype=F32) -> jax.Array:
    """[K, N] -> [N/32, K, 32]: 32-column panels, each contiguous over K; in `dtype`, fp32 or
    bfloat16 (half the bytes to read; the kernel widens each weight exactly and multiplies in
    fp32)."""
    k, n = w.shape
    if n % PANEL:
        raise ValueError(f"pack: N = {n} columns is not a multiple of {PANEL}")
    if jnp.dtype(dtype) not in (jnp.dtype(F32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"pack: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}")
    return jnp.transpose(jnp.asarray(w).astype(dtype).reshape(k, n // PANEL, PANEL), (1, 0, 2))


def unpack(packed) -> jax.Array:
    """[N/32, K, 32] -> [K, N]."""
    p, k, c = packed.shape
    return jnp.transpose(packed, (1, 0, 2)).reshape(k, p * c)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A [K, N] fp32 weight held as `pack(w)` for `matmul`, and optionally as `plain` [K, N] too
    for products of many rows (XLA's dot, faster there than on the packed layout). A pytree (its
    arrays are its leaves), so it sits in params dicts, jit arguments and `jax.device_put` like an
    array."""

    packed: jax.Array
    plain: jax.Array | None = None

    def __call__(self, x):
        """x @ W: how a layer that takes weights as arguments (the drafter's `dense`) applies it."""
        return matmul(x, self)

    @property
    def shape(self) -> tuple[int, int]:
        p, k, c = self.packed.shape
        return k, p * c

    @property
    def dtype(self):
        return self.packed.dtype


def kernel_matmul(x, packed):
    """[..., K] fp32 @ packed [N/32, K, 32] (fp32 or bf16) -> [..., N] fp32 through the FFI kernel
    (it must be `available()`). Under vmap the kernel sees all rows at once (x batched, the
    weight not)."""
    if not available():
        raise RuntimeError(f"small_matmul kernel unavailable: {unavailable_reason()}")
    p, k, c = packed.shape
    if x.shape[-1] != k:
        raise ValueError(f"kernel_matmul: x has {x.shape[-1]} features, the weight {k}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (p * c,), F32)
    target = BF16_TARGET if packed.dtype == jnp.bfloat16 else TARGET
    call = jax.ffi.ffi_call(target, out, vmap_method="expand_dims")
    return call(x.astype(F32), packed)


def xla_matmul(x, packed):
    """The same product through XLA's dot on the packed layout (many rows: prefill)."""
    p, k, c = packed.shape
    out = jnp.einsum("...k,pkc->...pc", x.astype(F32), packed.astype(F32),
                     preferred_element_type=F32)  # fmt: skip
    return out.reshape(x.shape[:-1] + (p * c,))


def matmul(x, w: PackedWeight, rows: int | None = None):
    """[..., K] fp32 @ `w` -> [..., N] fp32: the kernel for up to `KERNEL_MAX_ROWS` rows (`rows`,
    the rows of one call; default the product of x's leading dims), and for more too unless `w`
    holds its `plain` copy, which XLA's dot then multiplies (a prompt's prefill: 156 against 182
    ms for 64 rows of SmolLM2, 324 against 384 for 160, 2-core Xeon; XLA's dot on the packed
    layout took 293 and 470). Without the kernel, XLA on the packed layout."""
    if rows is None:
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if rows > KERNEL_MAX_ROWS and w.plain is not None:
        return jnp.dot(x.astype(F32), w.plain, preferred_element_type=F32)
    if available():
        return kernel_matmul(x, w.packed)
    return xla_matmul(x, w.packed)


def pack_rows(w, dtype=F32) -> PackedWeight:
    """A [out, in] weight (torch's `Linear.weight` layout, the drafter's) as the `PackedWeight`
    of its transpose, in `dtype` (see `pack`): calling it gives x @ w.T."""
    return PackedWeight(pack(jnp.transpose(w), dtype))


def attention_applies(q, cache_k) -> bool:
    """Whether `kernel_attention` serves these operands: the kernel is built, at most
    `KERNEL_MAX_ROWS` new tokens, fp32 queries and cache, and a head size of whole vectors, at most
    `attention_max_head_dim()`."""
    return (
        q.shape[-3] <= KERNEL_MAX_ROWS
        and q.dtype == F32
        and cache_k.dtype == F32
        and available()
        and q.shape[-1] % tile()[0] == 0
        and q.shape[-1] <= attention_max_head_dim()
    )


def kernel_attention(q, k, v, cache_k, cache_v, mask):
    """Few-query attention through the FFI kernel, one sequence (vmap adds the batch):
    q [T, Hq, hd] (pre-scaled), k, v [T, Hkv, hd] (the new tokens), cache_k [Hkv, hd, S],
    cache_v [Hkv, S, hd], mask [T, S+T] bool -> [T, Hq*hd] fp32.

    The same result as `pipeline.llm.attention` to rounding, and a query's bits depend only on
    the keys it sees, in column order: a key attended from the cache (a one-token step) or
    among the new tokens (a tree verification) counts the same (see small_matmul.cc)."""
    if not available():
        raise RuntimeError(f"small_matmul kernel unavailable: {unavailable_reason()}")
    t, hq, hd = q.shape[-3:]
    out = jax.ShapeDtypeStruct(q.shape[:-3] + (t, hq * hd), F32)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="broadcast_all")
    return call(q, k, v, cache_k, cache_v, mask.astype(bool))
