"""Loading Llama-architecture weights into the params layout of `pipeline/llm.py`.

Two sources: a GGUF file (llama.cpp; tensors dequantized to fp32 with `gguf`, or with `native`
the Q4_0, Q4_1 and Q8_0 matrices kept in their blocks as `kernels.QuantWeight`) and a Hugging Face
folder (`config.json` + `*.safetensors`, read with the safetensors numpy API, no torch). Both give
`(LlamaConfig, params)` with layers stacked on a leading `N` axis and every weight matrix stored
`[in, out]` (so `x @ w`); the embedding, and `lm_head` when untied, stay `[V, D]`.

GGUF stores each matrix as Hugging Face does (`[out, in]`, row-major), but llama.cpp's converter
permutes the rows of q and k within each head so RoPE rotates adjacent pairs `(2i, 2i+1)`; the
model here uses Hugging Face's rotate-half pairs `(i, i + hd/2)`, so those rows are put back.

Every failure is a `ModelFileError` naming the file and the tensor or field at fault.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from pipeline import kernels
from pipeline.gguf_file import ModelFileError, bos_token_id, eos_token_ids, field, open_gguf
from pipeline.llm import LlamaConfig

# params["layers"] key -> (GGUF name in block i, HF name in layer i), both `[out, in]` matrices
# or `[D]` norm vectors.
LAYER_TENSORS = {
    "attn_norm": ("attn_norm", "input_layernorm"),
    "wq": ("attn_q", "self_attn.q_proj"),
    "wk": ("attn_k", "self_attn.k_proj"),
    "wv": ("attn_v", "self_attn.v_proj"),
    "wo": ("attn_output", "self_attn.o_proj"),
    "mlp_norm": ("ffn_norm", "post_attention_layernorm"),
    "w_gate": ("ffn_gate", "mlp.gate_proj"),
    "w_up": ("ffn_up", "mlp.up_proj"),
    "w_down": ("ffn_down", "mlp.down_proj"),
}
HF_ARCHITECTURES = ("LlamaForCausalLM",)

# A tensor source: (name, expected shape) -> fp32 array of that shape, or ModelFileError.
Fetch = Callable[[str, tuple[int, ...]], np.ndarray]


def _layer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's tensors as stored (`[out, in]`)."""
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    return {
        "attn_norm": (d,),
        "wq": (q, d),
        "wk": (kv, d),
        "wv": (kv, d),
        "wo": (d, q),
        "mlp_norm": (d,),
        "w_gate": (f, d),
        "w_up": (f, d),
        "w_down": (d, f),
    }


def unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """[H*hd, I] in llama.cpp's interleaved-pair row order -> the rotate-half order.

    Inverse of the converter's `w.reshape(H, 2, hd/2, I).swapaxes(1, 2)`.
    """
    out, inp = w.shape
    return w.reshape(num_heads, out // num_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _assemble(
    config: LlamaConfig,
    fetch: Fetch,
    names: dict[str, str],
    layer_name: Callable[[int, str], str],
    fix_layer: Callable[[str, np.ndarray], np.ndarray],
    dtype,
) -> dict:
    """The params pytree from a tensor source; `names` maps embed/final_norm/lm_head to source
    names, `layer_name(i, key)` names layer i's tensor, `fix_layer` undoes source quirks."""
    d, v = config.hidden_size, config.vocab_size
    total = 3 - config.tie_word_embeddings + len(_layer_shapes(config)) * config.num_layers
    # A bar on a terminal only (disable=None): Ray workers and tests log no \r lines.
    bar = tqdm(total=total, desc="loading weights", unit="tensor", disable=None, leave=False,
               file=sys.stderr)  # fmt: skip
    inner = fetch

    def fetch(name, shape):
        bar.update()
        return inner(name, shape)

    params = {
        "embed": fetch(names["embed"], (v, d)),
        "final_norm": fetch(names["final_norm"], (d,)),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = fetch(names["lm_head"], (v, d))
    layers = {}
    for key, shape in _layer_shapes(config).items():
        stack = [fix_layer(key, fetch(layer_name(i, key), shape)) for i in range(config.num_layers)]
        if isinstance(stack[0], RowQuant):
            layers[key] = RowQuant.stack(stack).packed()
        else:
            # Matrices are stored [out, in]; the model multiplies x @ w with w [in, out].
            layers[key] = np.stack([w.T if w.ndim == 2 else w for w in stack])
    params["layers"] = layers
    for key in ("embed", "lm_head"):
        if isinstance(params.get(key), RowQuant):
            # [V, D] rows in blocks along D: the head's [D, V] panels, which also give the
            # embedding's rows (`QuantWeight.columns`).
            params[key] = params[key].packed()
    bar.close()
    return _to_jax(params, dtype)


def _to_jax(tree, dtype):
    if isinstance(tree, dict):
        return {k: _to_jax(v, dtype) for k, v in tree.items()}
    if isinstance(tree, kernels.QuantWeight):
        return tree
    return jnp.asarray(tree, dtype=dtype)


# GGUF block formats `load_gguf(native=True)` keeps as they are (`kernels.QuantWeight`).
NATIVE_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


class RowQuant:
    """A GGUF matrix's blocks in its own row layout ([..., out, in]): values (uint8 0..15 for the
    4-bit formats, int8 for Q8_0), scale and offset (None for Q8_0) [..., out, in/32] fp32. Rows
    can be permuted (`unpermute_rope`) and stacked before `packed` lays them out for the kernel."""

    def __init__(self, values, scale, offset):
        self.values, self.scale, self.offset = values, scale, offset

    @classmethod
    def from_tensor(cls, data: np.ndarray, qtype, shape: tuple[int, int]) -> RowQuant:
        out, inp = shape
        blocks = np.asarray(data).reshape(out, inp // kernels.QK, -1)
        half = lambda a: np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32)
        scale = half(blocks[..., 0:2])
        if qtype == GGMLQuantizationType.Q8_0:
            return cls(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(out, inp),
                       scale, None)  # fmt: skip
        nibbles = blocks[..., -(kernels.QK // 2) :]  # byte j: weight j low, j + 16 high
        values = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(out, inp)
        # Q4_0's (q - 8) * d is q * d - 8 * d exactly: both products are exact in fp32.
        offset = half(blocks[..., 2:4]) if qtype == GGMLQuantizationType.Q4_1 else -8 * scale
        return cls(values, scale, offset)

    def permute(self, fn) -> RowQuant:
        offset = None if self.offset is None else fn(self.offset)
        return RowQuant(fn(self.values), fn(self.scale), offset)

    @classmethod
    def stack(cls, items) -> RowQuant:
        offset = None if items[0].offset is None else np.stack([i.offset for i in items])
        return cls(np.stack([i.values for i in items]), np.stack([i.scale for i in items]), offset)

    def packed(self) -> kernels.QuantWeight:
        return kernels.pack_quant(self.values, self.scale, self.offset)


def _check_shape(path, name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    _check_dims(path, name, tuple(array.shape), shape)
    return array


def _check_dims(path, name: str, dims: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if tuple(dims) != tuple(shape):
        raise ModelFileError(
            f"{path}: tensor {name!r} has shape {tuple(dims)}, but the config implies "
            f"{tuple(shape)}"
        )


# ---------------------------------------------------------------- GGUF


def gguf_config(reader, path) -> LlamaConfig:
    """LlamaConfig from a GGUF file's `llama.*` and `tokenizer.ggml.*` metadata."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFileError(
            f"{path}: unsupported architecture {arch!r} in GGUF field 'general.architecture'"
            " (only 'llama' is supported)"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelFileError(f"{path}: missing tensor 'token_embd.weight'")
    hidden = int(field(reader, "llama.embedding_length"))
    heads = int(field(reader, "llama.attention.head_count"))
    head_dim = int(field(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = int(field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim or "rope_freqs.weight" in tensors:
        raise ModelFileError(
            f"{path}: partial or scaled RoPE ('llama.rope.dimension_count' = {rope_dim}, "
            f"head dim {head_dim}, or a 'rope_freqs.weight' tensor) is not supported"
        )
    vocab = field(reader, "llama.vocab_size", None)
    return LlamaConfig(
        vocab_size=int(vocab if vocab is not None else tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=int(field(reader, "llama.feed_forward_length")),
        num_layers=int(field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_f32(field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        # llama.cpp writes no `output.weight` when the head is the embedding.
        tie_word_embeddings="output.weight" not in tensors,
        max_seq_len=int(field(reader, "llama.context_length", 2048)),
        bos_token_id=bos_token_id(reader),
        eos_token_ids=eos_token_ids(reader),
    )


def _f32(value) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def load_gguf(
    path: str | os.PathLike, dtype=jnp.float32, native: bool = False
) -> tuple[LlamaConfig, dict]:
    """A llama-architecture GGUF file -> (LlamaConfig, params), dequantized, cast to `dtype`.
    `native`: the matrices stored as Q4_0, Q4_1 or Q8_0 (with dimensions the kernel's panels
    fit) stay in their blocks, as `kernels.QuantWeight`s of the same fp32 values; the embedding
    (and an untied `lm_head`) is then held as the output head, [D, V]."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray | RowQuant:
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelFileError(f"{path}: missing tensor {name!r}")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if (native and qtype in NATIVE_TYPES and len(shape) == 2
                and shape[0] % kernels.PANEL == 0 and shape[1] % kernels.QK == 0):  # fmt: skip
            _check_dims(path, name, tuple(int(d) for d in reversed(tensor.shape)), shape)
            quant = RowQuant.from_tensor(tensor.data, qtype, shape)
            finite = [np.isfinite(a).all() for a in (quant.scale, quant.offset) if a is not None]
            if not all(finite):
                raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values")
            return quant
        try:
            array = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
        except (NotImplementedError, ValueError) as err:
            raise ModelFileError(f"{path}: tensor {name!r}: cannot dequantize: {err}") from None
        array = _check_shape(path, name, array, shape)
        if not np.isfinite(array).all():
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values")
        return array

    def fix(key: str, w):
        heads = {"wq": config.num_heads, "wk": config.num_kv_heads}.get(key)
        if heads is None:
            return w
        if isinstance(w, RowQuant):
            return w.permute(lambda a: unpermute_rope(a, heads))
        return unpermute_rope(w, heads)

    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight"}
    names["lm_head"] = "output.weight"
    return config, _assemble(
        config, fetch, names, lambda i, k: f"blk.{i}.{LAYER_TENSORS[k][0]}.weight", fix, dtype
    )


# ---------------------------------------------------------------- Hugging Face


def hf_config(folder: Path) -> LlamaConfig:
    """LlamaConfig from a Hugging Face `config.json` (transformers' LlamaConfig defaults)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file (a Hugging Face model folder needs one)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path}: invalid JSON: {err}") from None
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or not set(archs) & set(HF_ARCHITECTURES):
        raise ModelFileError(
            f"{path}: unsupported architecture (architectures={archs}, "
            f"model_type={raw.get('model_type')!r}); only {HF_ARCHITECTURES} is supported"
        )
    scaling = raw.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ModelFileError(f"{path}: field 'rope_scaling' = {scaling} is not supported")

    def need(key):
        if key not in raw:
            raise ModelFileError(f"{path}: missing field {key!r}")
        return raw[key]

    heads = int(need("num_attention_heads"))
    eos = raw.get("eos_token_id")
    return LlamaConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or need("hidden_size") // heads),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the `*.safetensors` file in `folder` holding it."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors files")
    index = {}
    for file in files:
        for name in _safetensors_header(file):
            index[name] = file
    return index


def _safetensors_header(file: Path) -> list[str]:
    """The tensor names in `file`, after checking each tensor's bytes lie inside the file, so a
    truncated file names the first tensor it cuts (safetensors' own error names none)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(fh.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{file}: corrupt safetensors file: {err}") from None
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = 8 + length + int(info["data_offsets"][1])
        if end > size:
            raise ModelFileError(
                f"{file}: tensor {name!r} ends at byte {end} but the file has {size} bytes"
                " (truncated?)"
            )
        names.append(name)
    return names


def load_hf(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """A Hugging Face Llama folder (`config.json` + `*.safetensors`) -> (LlamaConfig, params)."""
    folder = Path(folder)
    config = hf_config(folder)
    index = _safetensors_index(folder)
    handles = {}

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        file = index.get(name)
        if file is None:
            raise ModelFileError(f"{folder}: missing tensor {name!r} in any *.safetensors file")
        try:
            if file not in handles:
                handles[file] = safe_open(str(file), framework="numpy")
            array = handles[file].get_tensor(name)
        except (SafetensorError, OSError, TypeError) as err:
            raise ModelFileError(f"{file}: tensor {name!r}: cannot read: {err}") from None
        return _check_shape(file, name, array.astype(np.float32), shape)

    names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    names["lm_head"] = "lm_head.weight"
    layer_name = lambda i, k: f"model.layers.{i}.{LAYER_TENSORS[k][1]}.weight"
    return config, _assemble(config, fetch, names, layer_name, lambda k, w: w, dtype)


def load_model(
    path: str | os.PathLike, dtype=jnp.float32, native: bool = False
) -> tuple[LlamaConfig, dict]:
    """A `.gguf` file or a Hugging Face folder, by what `path` is; `native`: see `load_gguf` (a
    Hugging Face folder's tensors are not block-quantized, so it changes nothing there)."""
    path = Path(path)
    if path.is_dir():
        return load_hf(path, dtype)
    return load_gguf(path, dtype, native)
