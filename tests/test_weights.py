"""Weight loaders: a tiny random Llama in HF safetensors and in GGUF form (q/k permuted as
llama.cpp writes them) load to the same params and logits as an independent numpy forward; bad
files each give an error naming the file and the tensor or field."""

from __future__ import annotations

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import kernels
from pipeline.gguf_file import ModelFileError
from pipeline.llm import causal_mask, forward, init_cache
from pipeline.weights import load_gguf, load_hf, load_model
from tests.llama_files import (
    gguf_tensors,
    hf_config,
    random_hf_tensors,
    reference_logits,
    write_gguf,
    write_hf,
)

TOKENS = np.array([5, 17, 3, 90, 42, 8, 8, 61, 0, 33])


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request, tmp_path):
    cfg = hf_config(tied=request.param)
    tensors = random_hf_tensors(cfg, seed=int(request.param))
    hf_dir = write_hf(tmp_path / "hf", cfg, tensors)
    gguf_path = write_gguf(tmp_path / "tiny.gguf", cfg, gguf_tensors(cfg, tensors))
    return cfg, tensors, hf_dir, gguf_path


def _logits(config, params, tokens):
    t = len(tokens)
    cache = init_cache(config, 1, 4)
    mask = causal_mask(cache.lengths, 4, t)
    positions = jnp.arange(t)[None]
    return np.asarray(forward(params, config, jnp.asarray(tokens)[None], positions, cache, mask)[0])


def test_hf_params_are_the_source_tensors_in_x_at_w_layout(model):
    cfg, tensors, hf_dir, _ = model
    config, params = load_hf(hf_dir)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (2, 4, 2)
    assert config.tie_word_embeddings == cfg["tie_word_embeddings"]
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert config.rope_theta == cfg["rope_theta"]
    layer1 = lambda name: tensors[f"model.layers.1.{name}.weight"]
    np.testing.assert_array_equal(params["layers"]["wq"][1], layer1("self_attn.q_proj").T)
    np.testing.assert_array_equal(params["layers"]["w_down"][1], layer1("mlp.down_proj").T)
    np.testing.assert_array_equal(
        params["layers"]["mlp_norm"][1], layer1("post_attention_layernorm")
    )
    np.testing.assert_array_equal(params["embed"], tensors["model.embed_tokens.weight"])
    assert ("lm_head" in params) == (not cfg["tie_word_embeddings"])


def test_gguf_and_hf_give_identical_params_and_config(model):
    _, _, hf_dir, gguf_path = model
    hf_config_, hf_params = load_hf(hf_dir)
    gguf_config_, gguf_params = load_gguf(gguf_path)
    assert gguf_config_ == hf_config_
    flat_hf = dict(_flatten(hf_params))
    flat_gguf = dict(_flatten(gguf_params))
    assert flat_hf.keys() == flat_gguf.keys()
    for name, value in flat_hf.items():
        np.testing.assert_array_equal(flat_gguf[name], value, err_msg=name)


def test_both_loaders_match_an_independent_numpy_forward(model):
    cfg, tensors, hf_dir, gguf_path = model
    want = reference_logits(cfg, tensors, TOKENS)
    for load, path in ((load_hf, hf_dir), (load_gguf, gguf_path), (load_model, gguf_path)):
        config, params = load(path)
        got = _logits(config, params, TOKENS)[0]
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4, err_msg=load.__name__)


def test_without_unpermuting_q_k_the_logits_differ(model):
    """The q/k permutation is not a no-op at these shapes, so the test above can fail."""
    cfg, tensors, _, gguf_path = model
    config, params = load_gguf(gguf_path)
    permuted = gguf_tensors(cfg, tensors)
    wq = np.stack([permuted[f"blk.{i}.attn_q.weight"].T for i in range(2)])
    params = {**params, "layers": {**params["layers"], "wq": jnp.asarray(wq)}}
    got = _logits(config, params, TOKENS)[0]
    assert np.abs(got - reference_logits(cfg, tensors, TOKENS)).max() > 1e-2


def test_quantized_gguf_dequantizes_close_to_the_source(tmp_path):
    cfg = hf_config(tied=True)
    tensors = random_hf_tensors(cfg)
    path = write_gguf(
        tmp_path / "q8.gguf", cfg, gguf_tensors(cfg, tensors), qtype=gguf.GGMLQuantizationType.Q8_0
    )
    _, params = load_gguf(path)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    wq = tensors["model.layers.0.self_attn.q_proj.weight"].T
    err = np.abs(np.asarray(params["layers"]["wq"][0]) - wq).max()
    assert 0 < err < 0.02 * np.abs(wq).max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_native_keeps_the_blocks_with_the_values_fp32_loads(tmp_path, qtype):
    """`load_gguf(native=True)` holds every matrix whose widths fit the kernel's panels in its
    GGUF blocks (the rest as fp32, here the 16-row k and v), with exactly the values the fp32 load
    dequantizes, q and k rows unpermuted alike; the embedding as the [D, V] head."""
    cfg = hf_config(tied=True)
    qtype = gguf.GGMLQuantizationType[qtype]
    path = write_gguf(tmp_path / "q.gguf", cfg, gguf_tensors(cfg, random_hf_tensors(cfg)),
                      qtype=qtype)  # fmt: skip
    config, fp32 = load_gguf(path)
    native_config, native = load_model(path, native=True)
    assert native_config == config
    d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    embed = native["embed"]
    assert isinstance(embed, kernels.QuantWeight) and embed.shape == (d, v)
    np.testing.assert_array_equal(np.asarray(embed.dequantized()).T, fp32["embed"])
    kinds = {}
    for key, w in native["layers"].items():
        kinds[key] = type(w).__name__
        got = w.dequantized() if isinstance(w, kernels.QuantWeight) else w
        np.testing.assert_array_equal(np.asarray(got), np.asarray(fp32["layers"][key]), key)
    assert kinds["wq"] == kinds["w_up"] == kinds["w_down"] == "QuantWeight"
    assert kinds["wk"] == kinds["wv"] == kinds["attn_norm"] == "ArrayImpl"
    assert native["layers"]["w_up"].shape == (d, f)
    assert native["layers"]["w_up"].bits == (8 if qtype.name == "Q8_0" else 4)
    # The stacked forward (the kernel where it is built, else XLA on the expanded blocks).
    np.testing.assert_allclose(_logits(config, native, TOKENS), _logits(config, fp32, TOKENS),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_dtype_argument_casts_every_leaf(model):
    _, _, _, gguf_path = model
    _, params = load_gguf(gguf_path, dtype=jnp.bfloat16)
    assert {leaf.dtype for _, leaf in _flatten(params)} == {jnp.dtype(jnp.bfloat16)}


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield prefix + key, np.asarray(value)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def tiny(tmp_path):
    cfg = hf_config(tied=True)
    return cfg, random_hf_tensors(cfg), tmp_path


def _expect(error_parts, load, path):
    with pytest.raises(ModelFileError) as info:
        load(path)
    for part in error_parts:
        assert part in str(info.value), (part, str(info.value))


def test_gguf_unknown_architecture(tiny):
    cfg, tensors, tmp = tiny
    path = write_gguf(tmp / "m.gguf", cfg, gguf_tensors(cfg, tensors), arch="falcon")
    _expect([str(path), "'falcon'", "general.architecture"], load_gguf, path)


def test_gguf_missing_tensor(tiny):
    cfg, tensors, tmp = tiny
    named = gguf_tensors(cfg, tensors)
    del named["blk.1.ffn_up.weight"]
    path = write_gguf(tmp / "m.gguf", cfg, named)
    _expect([str(path), "missing tensor 'blk.1.ffn_up.weight'"], load_gguf, path)


def test_gguf_shape_mismatch(tiny):
    cfg, tensors, tmp = tiny
    named = gguf_tensors(cfg, tensors)
    named["blk.0.attn_k.weight"] = named["blk.0.attn_k.weight"][:8]
    path = write_gguf(tmp / "m.gguf", cfg, named)
    _expect([str(path), "'blk.0.attn_k.weight'", "(8, 32)", "(16, 32)"], load_gguf, path)


def test_gguf_truncated_names_the_cut_tensor(tiny):
    cfg, tensors, tmp = tiny
    named = gguf_tensors(cfg, tensors)
    path = write_gguf(tmp / "m.gguf", cfg, named)
    data = path.read_bytes()
    last = list(named)[-1]
    path.write_bytes(data[: len(data) - 100])
    _expect([str(path.resolve()), f"'{last}'", "truncated"], load_gguf, path)


def test_gguf_corrupt_and_missing_files(tiny):
    _, _, tmp = tiny
    bad = tmp / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    _expect([str(bad.resolve()), "corrupt"], load_gguf, bad)
    _expect([str(tmp / "absent.gguf"), "no such"], load_gguf, tmp / "absent.gguf")


def test_gguf_nan_weights(tiny):
    cfg, tensors, tmp = tiny
    named = gguf_tensors(cfg, tensors)
    named["blk.1.attn_v.weight"] = named["blk.1.attn_v.weight"].copy()
    named["blk.1.attn_v.weight"][3, 4] = np.nan
    path = write_gguf(tmp / "m.gguf", cfg, named)
    _expect([str(path), "'blk.1.attn_v.weight'", "NaN"], load_gguf, path)


def test_hf_unknown_architecture(tiny):
    cfg, tensors, tmp = tiny
    folder = write_hf(tmp / "hf", {**cfg, "architectures": ["GPT2LMHeadModel"]}, tensors)
    _expect([str(folder / "config.json"), "GPT2LMHeadModel"], load_hf, folder)


def test_hf_missing_tensor(tiny):
    cfg, tensors, tmp = tiny
    del tensors["model.layers.0.mlp.gate_proj.weight"]
    folder = write_hf(tmp / "hf", cfg, tensors)
    _expect([str(folder), "'model.layers.0.mlp.gate_proj.weight'"], load_hf, folder)


def test_hf_shape_mismatch(tiny):
    cfg, tensors, tmp = tiny
    folder = write_hf(tmp / "hf", {**cfg, "intermediate_size": 48}, tensors)
    _expect(["safetensors", "'model.layers.0.mlp.gate_proj.weight'", "(48, 32)"], load_hf, folder)


def test_hf_truncated_names_the_cut_tensor(tiny):
    cfg, tensors, tmp = tiny
    folder = write_hf(tmp / "hf", cfg, tensors, shards=1)
    file = next(folder.glob("*.safetensors"))
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    header = json.loads(file.read_bytes()[8 : 8 + header_len])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    file.write_bytes(file.read_bytes()[:-10])
    _expect([str(file), f"'{last}'", "truncated"], load_hf, folder)


def test_hf_corrupt_header_missing_config_and_missing_field(tiny):
    cfg, tensors, tmp = tiny
    folder = write_hf(tmp / "hf", cfg, tensors, shards=1)
    file = next(folder.glob("*.safetensors"))
    file.write_bytes(b"\xff" * 64)
    _expect([str(file), "corrupt"], load_hf, folder)
    _expect([str(tmp / "none" / "config.json")], load_hf, tmp / "none")
    bare = {k: v for k, v in cfg.items() if k != "num_hidden_layers"}
    folder = write_hf(tmp / "hf2", bare, tensors)
    _expect([str(folder / "config.json"), "'num_hidden_layers'"], load_hf, folder)


def test_hf_bfloat16_safetensors_load_as_their_values(tiny):
    cfg, tensors, tmp = tiny
    halves = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
    _, params = load_hf(write_hf(tmp / "bf16", cfg, halves))
    want = halves["model.layers.1.mlp.up_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(params["layers"]["w_up"][1], want)
    assert params["layers"]["w_up"].dtype == jnp.float32
