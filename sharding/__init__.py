"""Meshes over a host's local devices and batch-sharded jit; used by pipeline and cluster only."""

from sharding.mesh import (
    BATCH_AXIS,
    ShardedFn,
    batch_sharding,
    make_mesh,
    pad_batch,
    replicate,
    replicated,
    shard_jit,
    unpad,
)

__all__ = [
    "BATCH_AXIS",
    "ShardedFn",
    "batch_sharding",
    "make_mesh",
    "pad_batch",
    "replicate",
    "replicated",
    "shard_jit",
    "unpad",
]
