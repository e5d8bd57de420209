"""Orbax checkpoints: params + config round trip, restore onto shardings over 8 fake devices,
and clear errors for missing or mismatched checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pipeline.checkpoint import CheckpointError, load_config, restore_checkpoint, save_checkpoint
from pipeline.llm import LlamaConfig, init_params
from sharding.mesh import make_mesh, replicated

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    tie_word_embeddings=False,
    eos_token_ids=(2, 5),
    bos_token_id=1,
)


@dataclasses.dataclass(frozen=True)
class OtherConfig:
    width: int = 3


def _shapes(config):
    """The params layout of `config` (traced only, nothing computed)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), _shapes(CONFIG)
    )
    directory = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "llm", params, CONFIG)
    return directory, params


def _assert_same(got, want):
    leaves_got, tree_got = jax.tree.flatten(got)
    leaves_want, tree_want = jax.tree.flatten(want)
    assert tree_got == tree_want
    for a, b in zip(leaves_got, leaves_want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_keeps_config_and_params(saved):
    directory, params = saved
    config, restored = restore_checkpoint(directory, LlamaConfig)
    assert config == CONFIG and isinstance(config.eos_token_ids, tuple)
    _assert_same(restored, params)
    assert restored["embed"].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def test_restore_replicated_over_a_mesh(saved):
    directory, params = saved
    mesh = make_mesh(8)
    _, restored = restore_checkpoint(directory, LlamaConfig, sharding=replicated(mesh))
    _assert_same(restored, params)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated(mesh)
        assert len(leaf.addressable_shards) == 8


def test_restore_onto_a_per_leaf_sharding_tree_and_dtype(saved):
    directory, params = saved
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("model",))
    split = NamedSharding(mesh, PartitionSpec(None, None, "model"))
    whole = NamedSharding(mesh, PartitionSpec())
    # Split the per-layer matrices' output axis over 8 devices; everything else replicated.
    shardings = jax.tree.map(lambda x: split if x.ndim == 3 else whole, params)
    _, restored = restore_checkpoint(directory, LlamaConfig, shardings, dtype=jnp.bfloat16)
    wq = restored["layers"]["wq"]
    assert wq.sharding == split and wq.dtype == jnp.bfloat16
    assert wq.addressable_shards[0].data.shape == (2, 16, 2)
    np.testing.assert_array_equal(
        np.asarray(wq.astype(jnp.float32)),
        np.asarray(params["layers"]["wq"].astype(jnp.bfloat16).astype(jnp.float32)),
    )


def test_like_accepts_the_right_shapes_and_names_a_mismatch(saved):
    directory, params = saved
    _, restored = restore_checkpoint(directory, LlamaConfig, like=_shapes(CONFIG))
    _assert_same(restored, params)
    wider = dataclasses.replace(CONFIG, intermediate_size=48)
    with pytest.raises(
        CheckpointError, match=r"'layers/w_down' has shape \(2, 32, 16\), expected \(2, 48, 16\)"
    ):
        restore_checkpoint(directory, LlamaConfig, like=_shapes(wider))
    tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="unexpected tensor 'lm_head'"):
        restore_checkpoint(directory, LlamaConfig, like=_shapes(tied))
    extra = {**params, "bias": jnp.zeros(3)}
    with pytest.raises(CheckpointError, match="missing tensor 'bias'"):
        restore_checkpoint(directory, LlamaConfig, like=extra)


def test_wrong_config_type_missing_checkpoint_and_overwrite(saved, tmp_path):
    directory, params = saved
    with pytest.raises(CheckpointError, match="holds a LlamaConfig, but a OtherConfig"):
        load_config(directory, OtherConfig)
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing" / "config.json")):
        restore_checkpoint(tmp_path / "nothing", LlamaConfig)
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(directory, params, CONFIG)
    small = {"w": jnp.arange(4.0)}
    again = save_checkpoint(tmp_path / "other", small, OtherConfig(7))
    save_checkpoint(again, {"w": jnp.ones(2)}, OtherConfig(9), overwrite=True)
    config, restored = restore_checkpoint(again, OtherConfig)
    assert config == OtherConfig(9)
    np.testing.assert_array_equal(restored["w"], np.ones(2))


def test_params_folder_missing(tmp_path):
    directory = save_checkpoint(tmp_path / "c", {"w": jnp.ones(2)}, OtherConfig())
    for child in sorted((directory / "params").rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    (directory / "params").rmdir()
    with pytest.raises(CheckpointError, match="params"):
        restore_checkpoint(directory, OtherConfig)
