"""pipeline.kernels: the small-M CPU matmul kernel (built with the machine's g++ here), its
packing, its dispatch in the model, and the engine's choice of it. Without a C++ compiler the
kernel's own tests skip and the fallback's run (tests/test_kernel_build.py: the build itself)."""

import os
import platform
import subprocess
import sys
import textwrap

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import CharTokenizer  # ids 4..31, inside this model's 64

from drafter.config import BeamConfig, DrafterConfig
from drafter.model import init_params as init_drafter
from drafter.sampling import SamplingConfig
from pipeline import kernels
from pipeline.engine import Engine, EngineConfig
from pipeline.generate import generate
from pipeline.llm import (
    HEAD_PACKED,
    LlamaConfig,
    attention,
    forward,
    init_cache,
    unstack_cache,
    unstack_layers,
    with_packed_weights,
)
from pipeline.llm import init_params as init_llm
from pipeline.prompts import PromptItem
from pipeline.weights import RowQuant

GREEDY = SamplingConfig()

# Every output width a multiple of the kernel's 32-column panel: q 64, k/v 32, MLP 128, vocab 64.
CONFIG = LlamaConfig(64, 64, 128, 2, num_heads=4, num_kv_heads=2, head_dim=16,
                     tie_word_embeddings=True, eos_token_ids=(2,))  # fmt: skip


@pytest.fixture
def needs_kernel():
    """Skips a test of the kernel itself where it is not built (no C++ compiler here)."""
    if not kernels.available():
        pytest.skip(f"the kernel is unavailable: {kernels.unavailable_reason()}")


def test_the_kernel_builds_on_this_machine():
    # Where there is a compiler (CI's machines have g++) a missing kernel is a failure.
    try:
        kernels._compiler()
    except RuntimeError as err:
        pytest.skip(str(err))
    assert kernels.available(), kernels.unavailable_reason()
    vector, rows = kernels.tile()
    assert vector in (4, 8, 16) and rows >= 1


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (5, 100, 96), (9, 576, 192), (13, 40, 64),
                                   (40, 33, 128)])  # fmt: skip
@pytest.mark.usefixtures("needs_kernel")
def test_kernel_matches_a_float64_product(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    got = np.asarray(jax.jit(kernels.kernel_matmul)(x, kernels.pack(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(kernels.unpack(kernels.pack(w)), w)


@pytest.mark.parametrize("m,k,n", [(1, 576, 8192), (9, 100, 96), (13, 40, 64)])
@pytest.mark.usefixtures("needs_kernel")
def test_bf16_weights_are_widened_exactly(m, k, n):
    """The bf16 kernel equals the fp32 product of the bf16-rounded weights, and each row's bits
    are the same alone or with others (as for fp32)."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    packed = kernels.pack(w, jnp.bfloat16)
    assert packed.dtype == jnp.bfloat16 and packed.shape == (n // 32, k, 32)
    run = jax.jit(kernels.kernel_matmul)
    got = np.asarray(run(x, packed))
    rounded = np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = x.astype(np.float64) @ rounded
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(run(x[-1:], packed)), got[-1:])
    # The kernel on bf16 panels equals its fp32 panels holding the same (rounded) values.
    np.testing.assert_array_equal(got, np.asarray(run(x, kernels.pack(rounded))))
    with pytest.raises(ValueError, match="float32 or bfloat16, got float16"):
        kernels.pack(w, jnp.float16)


@pytest.mark.usefixtures("needs_kernel")
def test_a_row_gets_the_same_bits_alone_or_with_other_rows():
    """What makes a one-token step and a verify tree agree exactly: one row's result does not
    depend on the rows beside it (any row tile, any count)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((27, 576), dtype=np.float32)
    w = kernels.pack(rng.standard_normal((576, 192), dtype=np.float32))
    run = jax.jit(kernels.kernel_matmul)
    together = np.asarray(run(x, w))
    for lo, hi in [(0, 1), (3, 4), (5, 14), (0, 12), (12, 27), (26, 27)]:
        np.testing.assert_array_equal(np.asarray(run(x[lo:hi], w)), together[lo:hi])


@pytest.mark.usefixtures("needs_kernel")
def test_leading_dims_and_vmap_see_one_weight():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 64), dtype=np.float32)
    w = rng.standard_normal((64, 96), dtype=np.float32)
    p = kernels.pack(w)
    want = np.asarray(jax.jit(kernels.kernel_matmul)(x.reshape(12, 64), p)).reshape(4, 3, 96)
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels.kernel_matmul)(x, p)), want)
    vmapped = jax.jit(jax.vmap(kernels.kernel_matmul, in_axes=(0, None)))(x, p)
    np.testing.assert_array_equal(np.asarray(vmapped), want)
    # Batched weights are not what the kernel serves: XLA reports its error.
    with pytest.raises(Exception, match="one weight per call"):
        jax.block_until_ready(jax.vmap(kernels.kernel_matmul)(x, jnp.stack([p] * 4)))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        kernels.pack(jnp.zeros((8, 40)))
    with pytest.raises(ValueError, match="x has 10 features, the weight 64"):
        kernels.kernel_matmul(jnp.zeros((2, 10)), kernels.pack(jnp.zeros((64, 32))))


def test_matmul_dispatches_by_rows():
    rng = np.random.default_rng(3)
    w = kernels.PackedWeight(kernels.pack(rng.standard_normal((64, 64), dtype=np.float32)))
    assert w.shape == (64, 64)
    both = kernels.PackedWeight(w.packed, kernels.unpack(w.packed))

    def jaxpr(weight, rows):
        return str(jax.make_jaxpr(lambda x: kernels.matmul(x, weight))(jnp.zeros((rows, 64))))

    # Few rows: the kernel; many: XLA's dot on the plain copy when there is one, else the kernel.
    # Without the kernel, XLA for all.
    built = kernels.available()
    assert ("ffi_call" in jaxpr(both, 4)) == built and "ffi_call" not in jaxpr(both, 100)
    assert ("ffi_call" in jaxpr(w, 100)) == built
    x = rng.standard_normal((100, 64), dtype=np.float32)
    np.testing.assert_allclose(kernels.matmul(x[:4], both), kernels.matmul(x, both)[:4],
                               atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(kernels.matmul(x, w), kernels.matmul(x, both), atol=1e-4)


QTYPES = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
          gguf.GGMLQuantizationType.Q8_0]  # fmt: skip


def quantized(w, qtype):
    """[K, N] fp32 -> (its `QuantWeight` in `qtype`'s blocks, gguf's fp32 dequantization [K, N])."""
    rows = np.ascontiguousarray(np.asarray(w, np.float32).T)  # GGUF's [out, in] rows
    blocks = gguf.quants.quantize(rows, qtype)
    weight = RowQuant.from_tensor(blocks, qtype, rows.shape).packed()
    return weight, gguf.quants.dequantize(blocks, qtype).T


# (rows, K, N): one row (expanded in registers), a few and many rows (expanded once per chunk of
# k, with partial sums between chunks: K = 160 is not a whole chunk), SmolLM2's widths.
QUANT_SHAPES = [(1, 64, 32), (2, 160, 64), (3, 576, 192), (9, 1536, 96), (40, 96, 128)]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,k,n", QUANT_SHAPES)
@pytest.mark.usefixtures("needs_kernel")
def test_quantized_weights_give_the_fp32_kernels_bits(qtype, m, k, n):
    """A `QuantWeight` is the fp32 kernel on gguf's dequantized weights, bit for bit (the same
    fused multiply-adds in the same order), and close to a float64 product; a row's bits do not
    depend on the rows beside it; `dequantized` and `columns` give gguf's values exactly."""
    rng = np.random.default_rng(m * k + n)
    weight, dense = quantized(rng.standard_normal((k, n)) * 0.1, qtype)
    assert weight.bits == (8 if qtype == gguf.GGMLQuantizationType.Q8_0 else 4)
    assert weight.shape == (k, n) and weight.nbytes < dense.nbytes / 3
    np.testing.assert_array_equal(np.asarray(weight.dequantized()), dense)
    ids = np.array([0, n - 1, n // 2 + 1, 17 % n])
    np.testing.assert_array_equal(np.asarray(weight.columns(jnp.asarray(ids))), dense[:, ids].T)
    x = rng.standard_normal((m, k), dtype=np.float32)
    got = np.asarray(jax.jit(kernels.kernel_quant_matmul)(x, weight))
    np.testing.assert_array_equal(got, np.asarray(kernels.kernel_matmul(x, kernels.pack(dense))))
    want = x.astype(np.float64) @ dense.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(kernels.matmul(x[-1:], weight)), got[-1:])
    # Under vmap the weight is shared (it arrives with a leading dim of 1).
    vmapped = jax.vmap(kernels.kernel_quant_matmul, in_axes=(0, None))(x[:, None], weight)
    np.testing.assert_array_equal(np.asarray(vmapped)[:, 0], got)


def test_quant_weights_bad_input_is_named():
    with pytest.raises(ValueError, match="need N a multiple of 32"):
        kernels.pack_quant(np.zeros((40, 64), np.int8), np.zeros((40, 2), np.float32))
    with pytest.raises(ValueError, match="4-bit values must be uint8 in 0..15"):
        kernels.pack_quant(np.full((32, 32), 16, np.uint8), np.zeros((32, 1)), np.zeros((32, 1)))
    weight, _ = quantized(np.zeros((64, 32)), gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="x has 10 features, the weight 64"):
        kernels.kernel_quant_matmul(jnp.zeros((2, 10)), weight)


def _attention_inputs(rng, b, t, hq, hkv, hd, s, visible=0.7):
    shape = (b,) if b else ()
    q = rng.standard_normal(shape + (t, hq, hd), dtype=np.float32)
    k, v = (rng.standard_normal(shape + (t, hkv, hd), dtype=np.float32) for _ in range(2))
    cache_k = rng.standard_normal(shape + (hkv, hd, s), dtype=np.float32)
    cache_v = rng.standard_normal(shape + (hkv, s, hd), dtype=np.float32)
    mask = rng.random(shape + (t, s + t)) < visible
    mask[..., np.arange(t), s + np.arange(t)] = True  # every token sees itself
    return q, k, v, cache_k, cache_v, mask


# (batch, new tokens, query heads, kv heads, head size, cache slots); SmolLM2's heads are 9/3 x 64.
ATTENTION_SHAPES = [(0, 1, 9, 3, 64, 200), (0, 9, 9, 3, 64, 200), (0, 5, 4, 2, 16, 37),
                    (0, 3, 2, 2, 32, 0), (0, 32, 4, 1, 16, 5), (3, 4, 4, 2, 16, 20),
                    (2, 9, 9, 3, 64, 150)]  # fmt: skip


@pytest.mark.parametrize("b,t,hq,hkv,hd,s", ATTENTION_SHAPES)
@pytest.mark.usefixtures("needs_kernel")
def test_kernel_attention_matches_the_xla_one(b, t, hq, hkv, hd, s):
    """Masks with holes anywhere, grouped heads, an empty cache, a batch (vmapped; the last
    shape big enough to share the work out over threads)."""
    rng = np.random.default_rng(b * 1000 + t * 10 + s)
    args = _attention_inputs(rng, b, t, hq, hkv, hd, s)
    assert kernels.attention_applies(args[0], args[3])

    def both(*a):
        return attention(*a), attention(*a, use_kernel=True)

    run = jax.jit(jax.vmap(both) if b else both)
    want, got = run(*args)
    hlo = jax.jit(jax.vmap(both) if b else both).lower(*args).as_text()
    assert kernels.ATTENTION_TARGET in hlo
    assert got.shape == want.shape == (args[0].shape[:-2] + (hq * hd,))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.usefixtures("needs_kernel")
def test_kernel_attention_gives_a_key_the_same_bits_in_the_cache_or_among_the_new_tokens():
    """What keeps a one-token step and a tree verification exact: token i of a chain attends to
    tokens 0..i-1 committed to the cache (one at a time) or as new tokens beside it (a chain
    verified in one call), and gets the same bits either way."""
    rng = np.random.default_rng(5)
    hq, hkv, hd, slots, committed, n = 9, 3, 64, 50, 30, 4
    keys, values = (rng.standard_normal((committed + n, hkv, hd), dtype=np.float32)
                    for _ in range(2))  # fmt: skip
    q = rng.standard_normal((n, hq, hd), dtype=np.float32)

    def cache(length):
        ck = np.zeros((hkv, hd, slots), np.float32)
        cv = np.zeros((hkv, slots, hd), np.float32)
        ck[:, :, :length] = keys[:length].transpose(1, 2, 0)
        cv[:, :length] = values[:length].transpose(1, 0, 2)
        return ck, cv

    run = jax.jit(lambda *a: attention(*a, use_kernel=True))
    mask = np.zeros((n, slots + n), bool)
    mask[:, :committed] = True
    mask[:, slots:] = np.tril(np.ones((n, n), bool))
    chain = np.asarray(run(q, keys[committed:], values[committed:], *cache(committed), mask))
    for i in range(n):
        one = np.zeros((1, slots + 1), bool)
        one[:, : committed + i] = one[:, slots] = True
        new = slice(committed + i, committed + i + 1)
        alone = run(q[i : i + 1], keys[new], values[new], *cache(committed + i), one)
        np.testing.assert_array_equal(np.asarray(alone)[0], chain[i])


@pytest.mark.usefixtures("needs_kernel")
def test_kernel_attention_is_used_where_it_applies():
    rng = np.random.default_rng(6)
    vector, biggest = kernels.tile()[0], kernels.attention_max_head_dim()
    assert biggest % vector == 0
    q, k, v, ck, cv, mask = _attention_inputs(rng, 0, 4, 4, 2, 2 * vector, 8)
    assert kernels.attention_applies(q, ck)
    assert not kernels.attention_applies(q[:, :, : vector + vector // 2], ck)  # a part vector
    assert not kernels.attention_applies(np.zeros((4, 4, biggest + vector), np.float32), ck)
    assert kernels.attention_applies(np.zeros((4, 4, biggest), np.float32), ck)
    assert not kernels.attention_applies(q.astype(jnp.bfloat16), ck)
    assert not kernels.attention_applies(np.zeros((33, 4, 2 * vector), np.float32), ck)  # prefill
    # Where it does not apply, `use_kernel` keeps XLA's attention.
    long = _attention_inputs(rng, 0, 40, 4, 2, 16, 8)
    hlo = jax.jit(lambda *a: attention(*a, use_kernel=True)).lower(*long).as_text()
    assert kernels.ATTENTION_TARGET not in hlo


def test_a_packed_forward_equals_the_plain_one():
    params = unstack_layers(init_llm(CONFIG, jax.random.key(0)))
    packed = with_packed_weights(params)
    assert isinstance(packed["layers"][0]["wqkv"], kernels.PackedWeight)
    assert HEAD_PACKED in packed and "head_t" not in packed
    cache = unstack_cache(init_cache(CONFIG, 2, 16))
    tokens = jnp.array([[5, 9, 3], [7, 1, 4]])
    positions = jnp.broadcast_to(jnp.arange(3), (2, 3))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((3, 3), bool)), (2, 3, 3))
    mask = jnp.concatenate([jnp.zeros((2, 3, 16), bool), mask], axis=-1)
    run = jax.jit(lambda p, c: forward(p, CONFIG, tokens, positions, c, mask).logits)
    np.testing.assert_allclose(run(packed, cache), run(params, cache), rtol=1e-4, atol=1e-4)
    # The packed forward attends through the kernel too (3 new tokens), the plain one does not.
    built = kernels.available()
    assert (kernels.ATTENTION_TARGET in run.lower(packed, cache).as_text()) == built
    assert kernels.ATTENTION_TARGET not in run.lower(params, cache).as_text()
    with pytest.raises(ValueError, match="fp32 weights only"):
        with_packed_weights(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    with pytest.raises(ValueError, match="unstack the layers"):
        with_packed_weights(init_llm(CONFIG, jax.random.key(0)))


ITEMS = [PromptItem(id="a", prompt="hello there"), PromptItem(id="b", prompt="hi"),
         PromptItem(id="c", prompt="a longer question?")]  # fmt: skip


WIDE = BeamConfig(3, 2)


def _engine(matmul, devices=1, beam=WIDE, batch_size=3):
    config = EngineConfig(beam=beam, max_new_tokens=12, devices=devices,
                          batch_size=batch_size, time_phases=False, matmul=matmul)  # fmt: skip
    llm = init_llm(CONFIG, jax.random.key(0))
    return Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())


@pytest.mark.usefixtures("needs_kernel")
def test_the_engine_uses_the_kernel_on_one_cpu_device_and_stays_exact():
    eng = _engine("auto")
    assert eng.matmul == "kernel" and eng.describe()["matmul"] == "kernel"
    assert isinstance(eng.llm_params["layers"][0]["w_gate_up"], kernels.PackedWeight)
    drafter_params, _ = eng.draft_params
    assert isinstance(drafter_params["rnn"]["u"], kernels.PackedWeight)
    assert eng.draft_params_for(1, WIDE) is eng.draft_params_for(3, WIDE)
    results = eng.generate(ITEMS)
    toks, lengths = eng._batch([eng.encode(item) for item in ITEMS])
    want = generate(eng.llm_params, CONFIG, toks, lengths, GREEDY, jax.random.key(0), 12)
    for i, r in enumerate(results):
        assert r["token_ids"] == [int(t) for t in want.tokens[i, : want.lengths[i]]]
    # A best-first tree for one prompt, row by row against the kernel's own AR decoding.
    tree = _engine("kernel", beam=BeamConfig(3, 4, tree=True), batch_size=1)
    for item in ITEMS:
        got = tree.generate([item])[0]["token_ids"]
        toks, lengths = tree._batch([tree.encode(item)])
        ar = generate(tree.llm_params, CONFIG, toks, lengths, GREEDY, jax.random.key(0), 12)
        assert got == [int(t) for t in ar.tokens[0, : ar.lengths[0]]]
    # XLA's dot gives the same tokens on this model.
    xla = _engine("xla")
    assert xla.matmul == "xla" and "head_t" in xla.llm_params
    assert [r["token_ids"] for r in xla.generate(ITEMS)] == [r["token_ids"] for r in results]


def native_params(params, layer_type=gguf.GGMLQuantizationType.Q4_1):
    """`params` ([in, out] layers stacked) quantized as a GGUF would hold them: the layer
    matrices in `layer_type`, the embedding in Q8_0, as `EngineConfig(weights="native")` holds
    them; and the fp32 params of the same values (what `weights="fp32"` loads)."""
    native = {k: v for k, v in params.items() if k != "layers"}
    dense = dict(native)
    native["layers"], dense["layers"] = dict(params["layers"]), dict(params["layers"])

    def rows(w, qtype):
        rows = np.ascontiguousarray(np.asarray(w, np.float32))
        blocks = gguf.quants.quantize(rows, qtype)
        return (RowQuant.from_tensor(blocks, qtype, rows.shape),
                gguf.quants.dequantize(blocks, qtype))  # fmt: skip

    for key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        per_layer = [rows(w.T, layer_type) for w in params["layers"][key]]
        native["layers"][key] = RowQuant.stack([q for q, _ in per_layer]).packed()
        dense["layers"][key] = jnp.asarray(np.stack([d.T for _, d in per_layer]))
    quant, table = rows(params["embed"], gguf.GGMLQuantizationType.Q8_0)
    native["embed"], dense["embed"] = quant.packed(), jnp.asarray(table)
    return native, dense


@pytest.mark.parametrize("layer_type", QTYPES[:2], ids=lambda t: t.name)
@pytest.mark.usefixtures("needs_kernel")
def test_the_engine_on_native_weights_generates_what_their_fp32_values_generate(layer_type):
    """`weights="native"` (GGUF blocks through the kernel) against the fp32 engine on the same
    dequantized values: the same tokens, greedy and sampled, AR and speculative, alone and in a
    batch."""
    native, dense = native_params(init_llm(CONFIG, jax.random.key(0)), layer_type)
    sampled = SamplingConfig(temperature=0.8)
    greedy = None
    for sampling, beam in ((GREEDY, WIDE), (GREEDY, BeamConfig(3, 4, tree=True)), (sampled, WIDE)):
        outputs = []
        for params, speculate in ((dense, False), (native, False), (native, True)):
            config = EngineConfig(beam=beam, max_new_tokens=12, devices=1, batch_size=3,
                                  time_phases=False, sampling=sampling, speculate=speculate,
                                  draft_method="beam")  # fmt: skip
            eng = Engine.from_params(CONFIG, params, config=config, tokenizer=CharTokenizer())
            assert eng.matmul == "kernel"
            outputs.append([r["token_ids"] for r in eng.generate(ITEMS)])
        assert outputs[1] == outputs[0] and outputs[2] == outputs[0], (sampling, beam)
        greedy = greedy or outputs[0]
    held = eng.llm_params
    assert isinstance(held["embed"], kernels.QuantWeight) and HEAD_PACKED not in held
    assert isinstance(held["layers"][0]["wqkv"], kernels.QuantWeight)
    assert held["layers"][0]["wqkv"].shape == (64, 64 + 2 * 32)
    config = EngineConfig(max_new_tokens=12, devices=1, batch_size=1, time_phases=False)
    one = Engine.from_params(CONFIG, native, config=config, tokenizer=CharTokenizer())
    assert [one.generate([item])[0]["token_ids"] for item in ITEMS] == greedy


@pytest.mark.usefixtures("needs_kernel")
def test_the_drafter_head_rows_are_held_in_draft_head_dtype_and_output_stays_exact():
    """A tied drafter over a reduced vocabulary: its head rows through the kernel in bf16 (the
    default) or fp32; the drafts may differ, the generated tokens may not."""
    drafter_config = DrafterConfig(64, 64, exit_dim=64, tie_lm_head=True, draft_vocab_size=32)
    drafter = init_drafter(drafter_config, jax.random.key(1))
    vocab_map = jnp.arange(32, dtype=jnp.int32) + 2
    llm = init_llm(CONFIG, jax.random.key(0))
    out = {}
    for dtype in ("bfloat16", "float32"):
        config = EngineConfig(beam=BeamConfig(3, 4, tree=True),
                              max_new_tokens=12, batch_size=1, devices=1,
                              time_phases=False, matmul="kernel",
                              draft_head_dtype=dtype)  # fmt: skip
        eng = Engine.from_params(CONFIG, llm, drafter_config, drafter, config, CharTokenizer(),
                                 vocab_map)  # fmt: skip
        assert eng.draft_params[1].draft_head_t.dtype == jnp.dtype(dtype)
        out[dtype] = [eng.generate([item])[0]["token_ids"] for item in ITEMS]
        for item, got in zip(ITEMS, out[dtype], strict=True):
            toks, lengths = eng._batch([eng.encode(item)])
            ar = generate(eng.llm_params, CONFIG, toks, lengths, GREEDY, jax.random.key(0), 12)
            assert got == [int(t) for t in ar.tokens[0, : ar.lengths[0]]]
    assert out["bfloat16"] == out["float32"]
    with pytest.raises(ValueError, match="draft_head_dtype must be 'float32' or 'bfloat16'"):
        EngineConfig(draft_head_dtype="int8")


def test_the_kernel_is_not_used_where_it_does_not_apply():
    assert _engine("auto", devices=2).matmul == "xla"
    with pytest.raises(ValueError, match="matmul is 'kernel' but the batch is sharded over 2"):
        _engine("kernel", devices=2)
    with pytest.raises(ValueError, match="EngineConfig.matmul must be one of"):
        EngineConfig(matmul="fast")


def test_without_a_compiler_auto_falls_back_to_xla_with_a_warning(tmp_path):
    """A fresh process (the kernel's load is cached per process) with a compiler that does not
    exist and an empty kernel cache."""
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax
        from pipeline import kernels
        from pipeline.engine import Engine, EngineConfig
        from pipeline.llm import init_params
        from test_kernels import CONFIG
        assert not kernels.available()
        print("REASON", kernels.unavailable_reason())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = Engine.from_params(CONFIG, init_params(CONFIG, jax.random.key(0)),
                                     config=EngineConfig(devices=1, time_phases=False))
        print("PATH", eng.matmul)
        print("WARNED", any("kernel unavailable" in str(w.message) for w in caught))
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "SPECDRAFT_CACHE": str(tmp_path),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no-such-g++" in done.stdout
    assert "PATH xla" in done.stdout and "WARNED True" in done.stdout


# x86 builds narrower than this machine's: AVX2 (8 floats a vector), then SSE (4).
NARROWER_BUILDS = [("-mno-avx512f", 8), ("-mno-avx", 4)]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
@pytest.mark.parametrize("flags,vector", NARROWER_BUILDS)
@pytest.mark.usefixtures("needs_kernel")
def test_narrower_builds_pass_the_kernel_tests(tmp_path, flags, vector):
    """The kernel's AVX2 and SSE variants (`$SPECDRAFT_KERNEL_CXXFLAGS`), as machines without
    AVX-512 build them: this file's kernel-level tests, in a fresh process (the build is loaded
    once per process), bit-identity checks included. SmolLM2's 64-float heads fit every build."""
    root = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "SPECDRAFT_KERNEL_CXXFLAGS": flags, "SPECDRAFT_CACHE": str(tmp_path)}
    probe = (
        "from pipeline import kernels; assert kernels.available(), kernels.unavailable_reason();"
        " print(kernels.tile()[0], kernels.attention_max_head_dim())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    width, biggest = map(int, done.stdout.split())
    assert width == min(vector, kernels.tile()[0]) and biggest >= 64, done.stdout
    skip = "engine or drafter_head or compiler or narrower"  # the engine's own tests run above
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           f"not ({skip})", __file__], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-500:]
