"""sharding/: meshes over fake CPU devices, padding, batch-sharded jit, replicated params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import draft_batch, sample_drafts
from drafter.model import TargetEmbeddings, init_params
from sharding import (
    batch_sharding,
    make_mesh,
    pad_batch,
    replicate,
    replicated,
    shard_jit,
    unpad,
)

D, H, V = 16, 24, 40


def tiny_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w": jax.random.normal(k1, (D, H)) / np.sqrt(D),
        "b": jax.random.normal(k2, (H,)),
        "out": jax.random.normal(k3, (H, V)),
    }


def per_sequence(params, base_key, temperature, seq_id, x):
    """params, key, [], [] int, [D] -> [H], [] int32, [V]: a hidden state, a sampled token."""
    h = jnp.tanh(x @ params["w"] + params["b"])
    logits = h @ params["out"] / temperature
    token = jax.random.categorical(jax.random.fold_in(base_key, seq_id), logits)
    return h, token.astype(jnp.int32), jax.nn.log_softmax(logits)


batched = jax.vmap(per_sequence, in_axes=(None, None, None, 0, 0))


@pytest.fixture(scope="module")
def setup():
    params = tiny_params(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (8, D))
    ids = jnp.arange(100, 108, dtype=jnp.int32)
    return params, jax.random.key(7), xs, ids


def test_make_mesh_choices():
    assert make_mesh().size == len(jax.local_devices()) == 8
    mesh = make_mesh(4)
    assert mesh.axis_names == ("batch",) and mesh.size == 4
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    chosen = [jax.local_devices()[i] for i in (1, 3, 6)]
    assert list(make_mesh(chosen).devices) == chosen


@pytest.mark.parametrize(
    "devices, message",
    [(0, "need 1..8"), (9, "need 1..8"), ([], "empty"), ("dup", "duplicate")],
)
def test_make_mesh_rejects_bad_choices(devices, message):
    if devices == "dup":
        devices = [jax.local_devices()[0]] * 2
    with pytest.raises(ValueError, match=message):
        make_mesh(devices)


def test_pad_batch_repeats_last_row_and_unpad_strips_it():
    tree = {"a": np.arange(10).reshape(5, 2), "k": jax.random.split(jax.random.key(3), 5)}
    padded, n = pad_batch(tree, 4)
    assert n == 5 and padded["a"].shape == (8, 2) and padded["k"].shape == (8,)
    np.testing.assert_array_equal(padded["a"][5:], np.repeat(tree["a"][-1:], 3, axis=0))
    assert bool(jnp.all(jax.random.key_data(padded["k"][7]) == jax.random.key_data(tree["k"][4])))
    back = unpad(padded, n)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert pad_batch(tree, 5)[0]["a"].shape == (5, 2)  # already a multiple: untouched


def test_pad_batch_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="shared leading axis"):
        pad_batch({"a": np.zeros((3, 2)), "b": np.zeros((4,))}, 2)
    with pytest.raises(ValueError, match="shared leading axis"):
        pad_batch({"a": np.float32(1.0)}, 2)


def test_replicate_puts_one_full_copy_per_device(setup):
    params = setup[0]
    mesh = make_mesh(4)
    rep = replicate(params, mesh)
    for leaf, full in zip(jax.tree.leaves(rep), jax.tree.leaves(params), strict=True):
        assert leaf.sharding.is_fully_replicated
        shards = leaf.addressable_shards
        assert sorted(s.device.id for s in shards) == sorted(d.id for d in mesh.devices)
        assert all(s.data.shape == full.shape for s in shards)  # full, not per batch row
    # Putting already-replicated params again copies nothing: the very same arrays come back.
    again = jax.device_put(rep, replicated(mesh))
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(rep), strict=True))


@pytest.mark.parametrize("n_dev", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [5, 8])
def test_sharded_equals_unsharded(setup, n_dev, batch):
    params, key, xs, ids = setup
    xs, ids = xs[:batch], ids[:batch]
    expected = jax.jit(batched)(params, key, 0.7, ids, xs)
    mesh = make_mesh(n_dev)
    fn = shard_jit(batched, mesh, batch_argnums=(3, 4))
    got = fn(replicate(params, mesh), key, 0.7, ids, xs)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


@pytest.mark.parametrize("n_dev, batch", [(4, 5), (2, 8), (8, 8), (1, 3)])
def test_outputs_are_sharded_over_the_batch(setup, n_dev, batch):
    params, key, xs, ids = setup
    mesh = make_mesh(n_dev)
    fn = shard_jit(batched, mesh, batch_argnums=(3, 4))
    out, n_real = fn.padded(replicate(params, mesh), key, 0.7, ids[:batch], xs[:batch])
    assert n_real == batch
    padded_b = -(-batch // n_dev) * n_dev
    for leaf in out:
        assert leaf.shape[0] == padded_b
        assert leaf.sharding.is_equivalent_to(batch_sharding(mesh), leaf.ndim)
        shards = leaf.addressable_shards
        assert len(shards) == n_dev
        assert {s.device for s in shards} == set(mesh.devices.flat)
        assert all(s.data.shape == (padded_b // n_dev, *leaf.shape[1:]) for s in shards)
    if batch % n_dev == 0:  # nothing to strip: the plain call keeps the batch sharding
        h = fn(replicate(params, mesh), key, 0.7, ids[:batch], xs[:batch])[0]
        assert len({s.index[0].start for s in h.addressable_shards}) == n_dev


def test_compiled_once_per_padded_shape(setup):
    params, key, xs, ids = setup
    mesh = make_mesh(4)
    fn = shard_jit(batched, mesh, batch_argnums=(3, 4))
    rep = replicate(params, mesh)
    for b in (5, 7, 8, 6):  # all pad to 8 rows: one executable
        fn(rep, key, 0.7, ids[:b], xs[:b])
    assert fn.cache_size() == 1
    fn(rep, key, 0.7, ids[:3], xs[:3])  # pads to 4: a second one
    assert fn.cache_size() == 2


def test_static_args_and_argument_errors(setup):
    params, key, xs, ids = setup
    mesh = make_mesh(2)

    def scaled(p, k, scale, sid, x):
        return batched(p, k, 0.7, sid, x * scale)[0]

    fn = shard_jit(scaled, mesh, batch_argnums=(3, 4), static_argnums=2)
    np.testing.assert_array_equal(
        np.asarray(fn(params, key, 2.0, ids, xs)),
        np.asarray(jax.jit(scaled, static_argnums=2)(params, key, 2.0, ids, xs)),
    )
    with pytest.raises(ValueError, match="disagree on the batch size"):
        fn(params, key, 2.0, ids[:3], xs)
    with pytest.raises(ValueError, match="out of range"):
        shard_jit(scaled, mesh, batch_argnums=7)(params, key, 2.0, ids, xs)
    with pytest.raises(ValueError, match="both batch and static"):
        shard_jit(scaled, mesh, batch_argnums=(2, 3), static_argnums=2)


def test_per_sequence_keys_make_rows_independent_of_batch_and_devices(setup):
    """A row's sample depends on its sequence id only: not on neighbours, padding or devices."""
    params, key, xs, ids = setup
    alone = [
        int(jax.jit(batched)(params, key, 3.0, ids[i : i + 1], xs[i : i + 1])[1][0])
        for i in range(8)
    ]
    assert len(set(alone)) > 1  # high temperature: the draws really vary between rows
    for n_dev, rows in [(1, [0, 1, 2, 3, 4, 5, 6, 7]), (4, [6, 2, 5]), (8, [7, 0, 3, 1, 4])]:
        mesh = make_mesh(n_dev)
        fn = shard_jit(batched, mesh, batch_argnums=(3, 4))
        sel = np.array(rows)
        tokens = fn(replicate(params, mesh), key, 3.0, ids[sel], xs[sel])[1]
        assert [int(t) for t in tokens] == [alone[r] for r in rows]


# --- the real drafter under shard_jit -------------------------------------------------------

DRAFT_CONFIG = DrafterConfig(hidden_size=16, vocab_size=64, exit_dim=24, num_draft_layers=2)
BEAM = BeamConfig(width=4, length=3)


@pytest.fixture(scope="module")
def drafter_setup():
    k_params, k_embed, k_states, k_tokens = jax.random.split(jax.random.key(11), 4)
    params = init_params(DRAFT_CONFIG, k_params)
    target = TargetEmbeddings(embed=jax.random.normal(k_embed, (64, 16)))
    states = jax.random.normal(k_states, (8, 16))
    tokens = jax.random.randint(k_tokens, (8,), 0, 64)
    return params, target, states, tokens


def _assert_drafts_equal(got, expected):
    """Tokens exactly; log-probs to fp32 rounding (a device's share of the rows changes the
    matmul's row count, which may change XLA:CPU's kernel and so the last bit)."""
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    for g, e in zip(got[1:], expected[1:], strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert g.shape == e.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("n_dev, batch", [(1, 8), (2, 8), (4, 5), (8, 3)])
def test_sharded_beam_search_equals_unsharded(drafter_setup, n_dev, batch):
    params, target, states, tokens = drafter_setup
    args = (params, DRAFT_CONFIG, target, states[:batch], tokens[:batch], BEAM, True)
    expected = jax.jit(draft_batch, static_argnums=(1, 5, 6))(*args)
    mesh = make_mesh(n_dev)
    fn = shard_jit(draft_batch, mesh, batch_argnums=(3, 4), static_argnums=(1, 5, 6))
    rep_params, rep_target = replicate((params, target), mesh)
    got = fn(rep_params, DRAFT_CONFIG, rep_target, states[:batch], tokens[:batch], BEAM, True)
    _assert_drafts_equal(got, expected)
    padded, _ = fn.padded(rep_params, DRAFT_CONFIG, rep_target, *args[3:5], BEAM, True)
    assert padded.tokens.shape[0] % n_dev == 0
    assert len(padded.log_probs.addressable_shards) == n_dev
    assert padded.log_probs.sharding.is_equivalent_to(batch_sharding(mesh), 4)


def test_sharded_sampling_is_independent_of_batch_and_devices(drafter_setup):
    """sample_drafts keys each row by its sequence id: a row drafts the same tokens alone, in any
    batch, padded or not, on any number of devices."""
    params, target, states, tokens = drafter_setup
    ids = jnp.arange(40, 48, dtype=jnp.int32)
    key = jax.random.key(5)
    statics = (1, 8)
    run = jax.jit(sample_drafts, static_argnums=statics)
    alone = [
        run(params, DRAFT_CONFIG, target, states[i : i + 1], tokens[i : i + 1], key,
            ids[i : i + 1], 1.5, BEAM).tokens[0]
        for i in range(8)
    ]  # fmt: skip
    assert len({tuple(np.asarray(a).ravel()) for a in alone}) == 8  # really random per row
    for n_dev, rows in [(4, [5, 0, 7, 2, 3]), (8, [6, 1])]:
        mesh = make_mesh(n_dev)
        fn = shard_jit(sample_drafts, mesh, batch_argnums=(3, 4, 6), static_argnums=statics)
        sel = np.array(rows)
        got = fn(replicate(params, mesh), DRAFT_CONFIG, target, states[sel], tokens[sel], key,
                 ids[sel], 1.5, BEAM).tokens  # fmt: skip
        for row, r in zip(got, rows, strict=True):
            np.testing.assert_array_equal(np.asarray(row), np.asarray(alone[r]))
