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
`EngineConfig.draft_head_dtype`).

The kernel is compiled with the machine's C++ compiler (`$CXX`, else `g++` or `c++` on PATH;
`-march=native`, plus `$SPECDRAFT_KERNEL_CXXFLAGS`) into `~/.cache/specdraft/kernels/<hash>/`
(`$SPECDRAFT_CACHE/kernels/<hash>/` where that is set), keyed by the source, the compiler's
`--version`, the target as the compiler resolves `-march=native` with those flags (its predefined
macros: the instruction set extensions and the CPU it tunes for), jaxlib and the flags. A build
that fails, or runs past `$SPECDRAFT_KERNEL_BUILD_TIMEOUT_S` (`BUILD_TIMEOUT_S`, 300 s), leaves
its error in that folder's `build-failed.txt`, which later processes report without compiling
until it is deleted. Without a working compiler `available()` is False with the reason in
`unavailable_reason()`, and callers keep XLA's ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
PANEL = 32  # columns per packed panel: `NR` in small_matmul.cc
TARGET = "specdraft_small_matmul"
BF16_TARGET = "specdraft_small_matmul_bf16"  # bf16 weights, fp32 activations and sums
Q4_TARGET = "specdraft_small_matmul_q4"  # GGUF's 4-bit blocks (Q4_0, Q4_1): `QuantWeight`
Q8_TARGET = "specdraft_small_matmul_q8"  # GGUF's Q8_0 blocks
QK = 32  # weights per quantization block, along K
ATTENTION_TARGET = "specdraft_small_attention"
SOURCE = Path(__file__).with_name("small_matmul.cc")
# Rows (the product of x's leading dims) the kernel serves; more go to XLA. Decode steps and
# verify trees are far below; prefill is far above.
KERNEL_MAX_ROWS = 32
# The build's code generation flags. The target query for the cache key passes them too, so the
# key holds the instruction set the build will use.
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-fPIC")
# Seconds one compiler run (the build, or a query for the key) may take: a hung compiler would
# otherwise hold the build lock, and with it every worker waiting to load the kernel.
BUILD_TIMEOUT_S = 300.0
# How much longer than the build timeout a process waits for another's build before giving up.
LOCK_MARGIN_S = 60.0
FAILED = "build-failed.txt"  # a failed build's error, in its cache folder
STDERR_TAIL = 4000  # characters of a failed compiler's stderr kept in its reason


def _cache_root() -> Path:
    base = os.environ.get("SPECDRAFT_CACHE") or os.path.join(Path.home(), ".cache", "specdraft")
    return Path(base) / "kernels"


def _compiler() -> str:
    """The C++ compiler's path: `$CXX` (a name on PATH, or a path), else g++ or c++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        found = shutil.which(cxx)
        if found is None:
            raise RuntimeError(f"no C++ compiler: $CXX is {cxx!r}, which is not an executable")
        return found
    found = shutil.which("g++") or shutil.which("c++")
    if found is None:
        raise RuntimeError("no C++ compiler: no g++ or c++ on PATH, and $CXX is not set")
    return found


def _extra_flags() -> list[str]:
    """`$SPECDRAFT_KERNEL_CXXFLAGS`, appended to the build's flags: e.g. `-mno-avx512f` builds
    the AVX2 variant on an AVX-512 machine (the tests check the narrower builds that way)."""
    return os.environ.get("SPECDRAFT_KERNEL_CXXFLAGS", "").split()


def _build_timeout() -> float:
    """`$SPECDRAFT_KERNEL_BUILD_TIMEOUT_S`, else `BUILD_TIMEOUT_S`."""
    text = os.environ.get("SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", "").strip()
    if not text:
        return BUILD_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise RuntimeError(
            f"$SPECDRAFT_KERNEL_BUILD_TIMEOUT_S must be a positive number of seconds, got {text!r}"
        )
    return seconds


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`cmd` run to its end, or `subprocess.TimeoutExpired` after `timeout` seconds. It runs in
    its own session so that a timeout kills what it started too (the driver's cc1plus, as, ld),
    not only the driver."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace",
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # the timeout, or an interrupt
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _attempt(cmd: list[str], timeout: float) -> tuple[str | None, str]:
    """Runs `cmd`: (None, its stdout) if it succeeds, else (what went wrong, "")."""
    shown = " ".join(cmd)
    try:
        done = _run(cmd, timeout)
    except subprocess.TimeoutExpired:
        return (f"`{shown}` ran past the build timeout of {timeout:g} s "
                "($SPECDRAFT_KERNEL_BUILD_TIMEOUT_S) and was killed"), ""  # fmt: skip
    except OSError as err:
        return f"`{shown}` could not start: {err}", ""
    if done.returncode != 0:
        return f"`{shown}` exited with {done.returncode}:\n{done.stderr[-STDERR_TAIL:]}", ""
    return None, done.stdout


def _query(cmd: list[str], timeout: float) -> str:
    """A compiler query's stdout; a RuntimeError with the reason if it fails or times out."""
    error, out = _attempt(cmd, timeout)
    if error is not None:
        raise RuntimeError(f"asking the C++ compiler for the kernel's cache key failed: {error}")
    return out


def _target(cxx: str, flags: list[str], timeout: float) -> str:
    """What the compiler makes of `-march=native` and `flags` on this machine: its predefined
    macros (instruction set extensions, the CPU it tunes for), sorted. GCC and Clang both answer
    this, on any architecture."""
    out = _query([cxx, *CXXFLAGS, *flags, "-x", "c++", "-E", "-dM", "-"], timeout)
    return "\n".join(sorted(out.splitlines()))


def _out_dir(cxx: str, flags: list[str], timeout: float) -> Path:
    """The build's folder: a hash of what the library's code depends on. The compiler's own view
    of the target, not /proc/cpuinfo, so one home folder serves different CPUs safely."""
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _query([cxx, "--version"], timeout).encode(),
                 _target(cxx, flags, timeout).encode(), jaxlib.__version__.encode(),
                 " ".join(flags).encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    return _cache_root() / key.hexdigest()[:16]


def _check_not_failed(marker: Path) -> None:
    """Raises a cached build failure's error, with how to try again."""
    try:
        error = marker.read_text()
    except FileNotFoundError:
        return
    raise RuntimeError(_failure_reason(marker, error))


def _failure_reason(marker: Path, error: str) -> str:
    return (f"building {SOURCE.name} failed, and later processes will not try again until "
            f"{marker} (or its folder) is deleted: {error.rstrip()}")  # fmt: skip


@contextlib.contextmanager
def _locked(path: Path, wait_s: float):
    """An exclusive flock on `path`, waited for up to `wait_s` seconds."""
    with open(path, "w") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"waited {wait_s:g} s for another process's build of {SOURCE.name} "
                        f"(it holds {path}); giving up"
                    ) from None
                time.sleep(0.2)
        yield


def _build(cxx: str) -> Path:
    """The library's path: from the cache, else compiled now. A RuntimeError says why not."""
    flags = _extra_flags()
    timeout = _build_timeout()
    out_dir = _out_dir(cxx, flags, timeout)
    lib, marker = out_dir / "libsmall_matmul.so", out_dir / FAILED
    if lib.exists():
        return lib
    _check_not_failed(marker)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One build per machine at a time (Ray workers start together); the others wait and reuse its
    # library or its failure.
    with _locked(out_dir / ".lock", timeout + LOCK_MARGIN_S):
        if lib.exists():
            return lib
        _check_not_failed(marker)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        cmd = [cxx, *CXXFLAGS, "-shared", f"-I{jax.ffi.include_dir()}", *flags, str(SOURCE),
               "-o", tmp]  # fmt: skip
        try:
            error, _ = _attempt(cmd, timeout)
            if error is None:
                os.replace(tmp, lib)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if error is not None:
            # Written whole, then renamed: a process checking outside the lock never reads half.
            fd, part = tempfile.mkstemp(dir=out_dir, suffix=".txt.tmp")
            with os.fdopen(fd, "w") as f:
                f.write(error + "\n")
            os.replace(part, marker)
            raise RuntimeError(_failure_reason(marker, error))
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if jax.default_backend() != "cpu":
        return None, f"the default backend is {jax.default_backend()}, not the CPU"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
    except (RuntimeError, OSError) as err:
        return None, str(err)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SmallMatmul), platform="cpu")
    jax.ffi.register_ffi_target(BF16_TARGET, jax.ffi.pycapsule(lib.SmallMatmulBf16), platform="cpu")
    jax.ffi.register_ffi_target(Q4_TARGET, jax.ffi.pycapsule(lib.SmallMatmulQ4), platform="cpu")
    jax.ffi.register_ffi_target(Q8_TARGET, jax.ffi.pycapsule(lib.SmallMatmulQ8), platform="cpu")
    jax.ffi.register_ffi_target(
        ATTENTION_TARGET, jax.ffi.pycapsule(lib.SmallAttention), platform="cpu"
    )
    return lib, ""


@functools.cache
def build_id() -> str:
    """The loaded build's cache key (a hash of the source, compiler, target and flags), for
    anything measured through the kernel and cached (`pipeline.tree_costs`)."""
    _library()
    return _build(_compiler()).parent.name


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
    p, k, c = packed.shape
    if x.shape[-1] != k:
        raise ValueError(f"kernel_matmul: x has {x.shape[-1]} features, the weight {k}")
    if not available():
        raise RuntimeError(f"small_matmul kernel unavailable: {unavailable_reason()}")
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A [K, N] weight held in GGUF's quantization blocks (32 weights along K share a scale), in
    the panels of `pack`: `q` [N/32, K, 16] uint8 for the 4-bit formats (byte c of a panel row
    holds column c in its low nibble and column c + 16 in its high one) or [N/32, K, 32] int8 for
    Q8_0; `scale` and `offset` [N/32, K/32, 32] fp32, per column per block. A weight is
    q * scale + offset (Q4_1; Q4_0 is offset -8 * scale) or q * scale (Q8_0): exactly the fp32
    weight `gguf` dequantizes, since q * scale is exact in fp32. Leading axes (stacked layers)
    come before all three. A pytree, like `PackedWeight`; `pack_quant` makes one."""

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None = None

    def __call__(self, x):
        return matmul(x, self)

    def __getitem__(self, index) -> QuantWeight:
        """One layer of stacked weights (`pipeline.llm.unstack_layers`)."""
        pick = lambda a: None if a is None else a[index]
        return QuantWeight(self.q[index], self.scale[index], pick(self.offset))

    @property
    def bits(self) -> int:
        return 4 if self.q.shape[-1] == PANEL // 2 else 8

    @property
    def shape(self) -> tuple[int, int]:
        p, k, _ = self.q.shape[-3:]
        return k, p * PANEL

    @property
    def dtype(self):
        """The dtype of the products (and of the weights it stands for)."""
        return jnp.dtype(F32)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.q, self.scale, self.offset) if a is not None)

    def dequantized(self) -> jax.Array:
        """The [K, N] fp32 weight (leading axes kept)."""
        q = self.q
        if self.bits == 4:
            q = jnp.concatenate([q & 15, q >> 4], axis=-1)
        block = lambda a: jnp.repeat(a, QK, axis=-2)  # [.., P, K/32, 32] -> [.., P, K, 32]
        w = q.astype(F32) * block(self.scale)
        if self.offset is not None:
            w = w + block(self.offset)
        return jnp.swapaxes(w, -3, -2).reshape(*w.shape[:-3], w.shape[-2], -1)

    def columns(self, ids) -> jax.Array:
        """Columns `ids` ([...] ints) as [..., K] fp32: the rows of a tied embedding table held
        as its output head [D, V] (one copy serves both)."""
        p, c = ids // PANEL, ids % PANEL
        scale = jnp.repeat(self.scale[p, :, c], QK, axis=-1)  # [..., K]
        if self.bits == 4:
            byte = self.q[p, :, c % (PANEL // 2)]
            q = jnp.where((c >= PANEL // 2)[..., None], byte >> 4, byte & 15)
        else:
            q = self.q[p, :, c]
        w = q.astype(F32) * scale
        if self.offset is not None:
            w = w + jnp.repeat(self.offset[p, :, c], QK, axis=-1)
        return w


def pack_quant(values, scale, offset=None) -> QuantWeight:
    """A `QuantWeight` from a weight in GGUF's row layout: values [..., N, K] (the 4-bit formats:
    uint8 0..15 with `offset`; Q8_0: int8 without), scale and offset [..., N, K/32] fp32; the
    weight is [K, N] (x @ w), the transpose of GGUF's [out, in] rows. numpy in, jax out."""
    values, scale = np.asarray(values), np.asarray(scale, np.float32)
    *lead, n, k = values.shape
    if n % PANEL or k % QK or scale.shape != (*lead, n, k // QK):
        raise ValueError(f"pack_quant: values {values.shape}, scale {scale.shape}: need N a "
                         f"multiple of {PANEL}, K of {QK}, and scale [..., N, K/{QK}]")  # fmt: skip
    panels = lambda a: np.swapaxes(a.reshape(*lead, n // PANEL, PANEL, a.shape[-1]), -1, -2)
    v = panels(values)  # [..., P, K, 32]
    if offset is not None:
        if values.dtype != np.uint8 or values.max(initial=0) > 15:
            raise ValueError("pack_quant: 4-bit values must be uint8 in 0..15")
        q = v[..., : PANEL // 2] | (v[..., PANEL // 2 :] << 4)
        offset = jnp.asarray(panels(np.asarray(offset, np.float32)))
    elif values.dtype != np.int8:
        raise ValueError(f"pack_quant: 8-bit values must be int8, got {values.dtype}")
    else:
        q = v
    return QuantWeight(jnp.asarray(np.ascontiguousarray(q)), jnp.asarray(panels(scale)), offset)


def concat_quant(weights) -> QuantWeight:
    """Weights of one format side by side along N ([K, N1] | [K, N2] -> [K, N1 + N2])."""
    cat = lambda *a: jnp.concatenate(a, axis=-3)
    return jax.tree.map(cat, *weights)


def kernel_quant_matmul(x, w: QuantWeight):
    """[..., K] fp32 @ `w` -> [..., N] fp32 through the FFI kernel (it must be `available()`):
    the fp32 kernel's result on `w.dequantized()`, bit for bit, reading the blocks as stored."""
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"kernel_quant_matmul: x has {x.shape[-1]} features, the weight {k}")
    if not available():
        raise RuntimeError(f"small_matmul kernel unavailable: {unavailable_reason()}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), F32)
    if w.bits == 4:
        call = jax.ffi.ffi_call(Q4_TARGET, out, vmap_method="expand_dims")
        return call(x.astype(F32), w.q, w.scale, w.offset)
    call = jax.ffi.ffi_call(Q8_TARGET, out, vmap_method="expand_dims")
    return call(x.astype(F32), w.q, w.scale)


def matmul(x, w: PackedWeight | QuantWeight, rows: int | None = None):
    """[..., K] fp32 @ `w` -> [..., N] fp32: the kernel for up to `KERNEL_MAX_ROWS` rows (`rows`,
    the rows of one call; default the product of x's leading dims), and for more too unless `w`
    holds its `plain` copy, which XLA's dot then multiplies (a prompt's prefill: 156 against 182
    ms for 64 rows of SmolLM2, 324 against 384 for 160, 2-core Xeon; XLA's dot on the packed
    layout took 293 and 470). A `QuantWeight` goes through the kernel for any number of rows.
    Without the kernel, XLA on the packed layout (a `QuantWeight` expanded first)."""
    if isinstance(w, QuantWeight):
        if available():
            return kernel_quant_matmul(x, w)
        return jnp.dot(x.astype(F32), w.dequantized(), preferred_element_type=F32)
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
