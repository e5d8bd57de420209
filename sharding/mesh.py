"""Data parallelism over one host's local devices: a 1-D mesh with a single axis, "batch".

Model code knows nothing of meshes (STYLE.md principle 5): shardings are applied only here, at
the jit boundary. The batch (leading) axis of the batch arguments and of every output is split
over the devices; params and other arguments are replicated, put on the devices once by
`replicate` and reused by every call.

Axis type: the mesh axis is `AxisType.Auto` (JAX 0.10's `jax.make_mesh` defaults to `Explicit`).
With Auto the compiler propagates the batch sharding through the vmapped model by itself, so the
drafter and the LLM need no sharding annotations. Explicit axes would make shardings part of every
array's type and ask model code for `out_sharding=` on ops that touch the sharded axis: worth it
for tensor parallelism, not for a batch split where each row is independent.

A batch that does not divide the device count is padded by repeating its last row (always a valid
input, unlike zeros which may be an invalid token or key) and the padding is stripped from the
results. Randomness must come from per-row keys (`fold_in(base_key, sequence_id)`), so a row's
result depends neither on its neighbours, nor on the padding, nor on the device count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "batch"


def make_mesh(devices: None | int | Sequence[jax.Device] = None) -> Mesh:
    """A 1-D mesh, axis "batch", over this process's local devices.

    devices: None -> all local devices; an int n -> the first n; a list -> exactly those (each
    must be a distinct local device).
    """
    local = jax.local_devices()
    if devices is None:
        chosen = list(local)
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"make_mesh(devices={devices}): need 1..{len(local)} (local devices on this host)"
            )
        chosen = list(local[: int(devices)])
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("make_mesh(devices=[]): the device list is empty")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"make_mesh: duplicate devices in {chosen}")
        foreign = [d for d in chosen if d not in local]
        if foreign:
            raise ValueError(f"make_mesh: {foreign} are not local devices of this process")
    return Mesh(np.array(chosen), (BATCH_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
    """Split the leading axis over "batch"; trailing axes (ndim - 1 of them) replicated.

    The spec P("batch") already leaves unnamed trailing axes replicated, so `ndim` is only checked.
    """
    if ndim is not None and ndim < 1:
        raise ValueError(f"batch_sharding: an array of rank {ndim} has no batch axis to split")
    return NamedSharding(mesh, P(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of `tree` (e.g. params) on all devices of `mesh`, once: one full copy each.

    Call this once and pass the result to every call of a `shard_jit` function; leaves already
    replicated on `mesh` are not copied again.
    """
    return jax.device_put(tree, replicated(mesh))


def _batch_size(tree: Any, where: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{where}: a batch argument has no array leaves")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(f"{where}: batch leaves need one shared leading axis, got shapes {shapes}")
    (size,) = sizes
    if size == 0:
        raise ValueError(f"{where}: the batch is empty")
    return size


def _pad_leaf(x, extra: int):
    if extra == 0:
        return x
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad every leaf's leading axis [B, ...] -> [B', ...], B' the next multiple of `multiple`.

    Padding rows repeat the last real row. Returns (padded tree, B).
    """
    if multiple < 1:
        raise ValueError(f"pad_batch: multiple must be >= 1, got {multiple}")
    n_real = _batch_size(tree, "pad_batch")
    extra = -n_real % multiple
    return jax.tree.map(lambda x: _pad_leaf(x, extra), tree), n_real


def unpad(tree: Any, n_real: int) -> Any:
    """[B', ...] -> [B, ...] for every leaf: drop the padding rows that `pad_batch` added."""
    return jax.tree.map(lambda x: x if x.shape[0] == n_real else x[:n_real], tree)


class ShardedFn:
    """A per-batch function jitted once with batch-sharded in/out shardings; see `shard_jit`."""

    def __init__(self, fn, mesh: Mesh, batch_argnums: Sequence[int], static_argnums: Sequence[int]):
        self.mesh = mesh
        self.batch_argnums = tuple(batch_argnums)
        self.static_argnums = tuple(static_argnums)
        if set(self.batch_argnums) & set(self.static_argnums):
            raise ValueError("shard_jit: an argument cannot be both batch and static")
        self._fn = fn
        self._jitted: dict[int, Callable] = {}  # keyed by the number of positional arguments

    def _jit_for(self, nargs: int) -> Callable:
        # One jax.jit object per arity; jit's own cache then holds one executable per shape.
        if nargs not in self._jitted:
            dynamic = [i for i in range(nargs) if i not in self.static_argnums]
            in_shardings = tuple(
                batch_sharding(self.mesh) if i in self.batch_argnums else replicated(self.mesh)
                for i in dynamic
            )
            self._jitted[nargs] = jax.jit(
                self._fn,
                in_shardings=in_shardings,
                out_shardings=batch_sharding(self.mesh),
                static_argnums=self.static_argnums,
            )
        return self._jitted[nargs]

    def _place(self, args: tuple) -> tuple[tuple, int]:
        """Pad the batch arguments to the device count and put every argument on the mesh."""
        bad = [i for i in self.batch_argnums + self.static_argnums if not 0 <= i < len(args)]
        if bad:
            raise ValueError(f"shard_jit: argnums {bad} out of range for {len(args)} arguments")
        batch = {i: args[i] for i in self.batch_argnums}
        sizes = {_batch_size(v, f"shard_jit argument {i}") for i, v in batch.items()}
        if len(sizes) != 1:
            raise ValueError(f"shard_jit: batch arguments disagree on the batch size: {sizes}")
        padded, n_real = pad_batch(batch, self.mesh.size)
        placed = []
        for i, arg in enumerate(args):
            if i in self.static_argnums:
                placed.append(arg)
            elif i in padded:
                placed.append(jax.device_put(padded[i], batch_sharding(self.mesh)))
            else:
                # A no-op for leaves already replicated by `replicate`, so params are not re-sent.
                placed.append(jax.device_put(arg, replicated(self.mesh)))
        return tuple(placed), n_real

    def padded(self, *args) -> tuple[Any, int]:
        """Run on the padded batch: (outputs [B', ...] sharded over "batch", B)."""
        placed, n_real = self._place(args)
        return self._jit_for(len(args))(*placed), n_real

    def __call__(self, *args) -> Any:
        """Run and strip the padding: outputs [B, ...] (still sharded when B divides the mesh)."""
        out, n_real = self.padded(*args)
        return unpad(out, n_real)

    def cache_size(self) -> int:
        """How many executables are compiled (one per distinct padded shape and static value)."""
        return sum(j._cache_size() for j in self._jitted.values())


def shard_jit(
    fn: Callable,
    mesh: Mesh,
    batch_argnums: int | Sequence[int],
    static_argnums: int | Sequence[int] = (),
) -> ShardedFn:
    """Jit `fn` so the leading axis of its batch arguments and of all its outputs is split over
    the mesh's "batch" axis, and its other (non-static) arguments are replicated.

    `fn` takes positional arguments; each batch argument is a pytree whose leaves share a leading
    `B` axis, and every output leaf has a leading `B` axis too. The returned callable pads `B` to
    a multiple of the device count (so B=5 and B=7 on 4 devices reuse one executable) and strips
    the padding from the outputs. Pass params through `replicate(params, mesh)` once.
    """
    as_tuple = lambda n: (n,) if isinstance(n, int) else tuple(n)
    batch = as_tuple(batch_argnums)
    if not batch:
        raise ValueError("shard_jit: batch_argnums is empty; nothing to shard")
    return ShardedFn(fn, mesh, batch, as_tuple(static_argnums))
