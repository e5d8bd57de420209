"""Orbax checkpoints of a params pytree, with its frozen-dataclass config as JSON beside it.

Layout of a checkpoint folder:

    <dir>/config.json   {"config_type": "LlamaConfig", "config": {...dataclass fields...}}
    <dir>/params/       the orbax (StandardCheckpointer) tree

Restoring builds `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` targets from the stored
metadata, so each array is read straight onto its devices (for example replicated over a mesh)
without first landing whole on one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match what the caller expects; names the folder
    and the field or tensor at fault."""


def save_checkpoint(directory: str | os.PathLike, params, config, overwrite: bool = False) -> Path:
    """Write `params` (any pytree of arrays) and `config` (a dataclass) under `directory`."""
    directory = Path(directory).absolute()
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory}: already exists and is not empty (overwrite=False)")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
    checkpointer.wait_until_finished()
    record = {"config_type": type(config).__name__, "config": dataclasses.asdict(config)}
    # The config is written last, so a folder with a config.json holds finished params.
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def load_config(directory: str | os.PathLike, config_type: type):
    """The config stored beside a checkpoint, as `config_type` (checked by name and fields)."""
    path = Path(directory).absolute() / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (not a specdraft checkpoint folder?)")
    try:
        record = json.loads(path.read_text())
        stored_type, values = record["config_type"], record["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint config: {err!r}") from None
    if stored_type != config_type.__name__:
        raise CheckpointError(
            f"{path}: holds a {stored_type}, but a {config_type.__name__} was asked for"
        )
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{path}: fields {unknown} are not in {config_type.__name__}")
    # JSON has no tuples; frozen configs keep sequences as tuples to stay hashable.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_type(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid {config_type.__name__}: {err}") from None


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_like(directory: Path, stored, like) -> None:
    """CheckpointError naming the first tensor whose presence or shape differs from `like`."""
    flat_stored = {_leaf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    flat_like = {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
    for name in sorted(set(flat_stored) | set(flat_like)):
        if name not in flat_stored:
            raise CheckpointError(f"{directory}: missing tensor {name!r}")
        if name not in flat_like:
            raise CheckpointError(f"{directory}: unexpected tensor {name!r}")
        got, want = tuple(flat_stored[name].shape), tuple(flat_like[name].shape)
        if got != want:
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {got}, expected {want}")


def _targets(stored, sharding, dtype):
    """ShapeDtypeStruct targets from stored metadata; `sharding` is one Sharding for every leaf,
    a pytree of Shardings matching the params, or None (the first local device)."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=sharding), stored
        )
    return jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s), stored, sharding
    )


def restore_checkpoint(
    directory: str | os.PathLike,
    config_type: type,
    sharding=None,
    like=None,
    dtype=None,
):
    """(config, params) from `directory`, each array placed by `sharding` and cast to `dtype`.

    `like` (a params pytree or `jax.eval_shape` of one) makes a checkpoint with other tensors
    or shapes an error naming the tensor, before anything is read.
    """
    directory = Path(directory).absolute()
    config = load_config(directory, config_type)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (the checkpoint holds no params)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(params_dir).item_metadata.tree
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CheckpointError(f"{params_dir}: unreadable orbax metadata: {err}") from None
    if like is not None:
        _check_like(directory, stored, like)
    try:
        targets = _targets(stored, sharding, dtype)
    except ValueError as err:
        raise CheckpointError(
            f"{directory}: the sharding tree does not match the stored params: {err}"
        ) from None
    return config, checkpointer.restore(params_dir, targets)
