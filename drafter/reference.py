"""Read and write drafter weights in the PyTorch reference's format, without torch.

A reference checkpoint is a folder with `config.json` (`vocab_size`, `hidden_size`, `exit_dim`,
`num_draft_layers`, `rnn`) and `model.safetensors` holding torch `Linear` weights ([out, in]):

    input_proj.weight [E, 2D], input_proj.bias [E]            (iff 2D != E)
    lm_head.{i}.linear.weight [E, E], lm_head.{i}.linear.bias [E]   for i < num_draft_layers
    lm_head.{n}.weight [V, E]                                  (n = num_draft_layers)
    rnn_u.weight [D, D], rnn_u.bias [D], rnn_w.weight [D, D]

Our params keep torch's [out, in] layout. The reference's input is concat(llm_state, rnn_state), so
the first D input columns of the layer that reads it are our `w_llm` and the last D our `w_rnn`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from drafter.config import DrafterConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_CONFIG_KEYS = ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers")


def _read_config(path: Path, reference_logits: bool, draft_vocab_size) -> DrafterConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the drafter config: {err}") from err
    missing = [k for k in _CONFIG_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    if not raw.get("rnn", False):
        raise ValueError(f"{path}: field rnn must be true (only the RNN drafter is supported)")
    try:
        return DrafterConfig(
            **{k: raw[k] for k in _CONFIG_KEYS},
            draft_vocab_size=draft_vocab_size,
            reference_logits=reference_logits,
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


class _Tensors:
    """Named tensors of one file, checked for shape as they are taken."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.arrays = load_file(str(path))
        except Exception as err:  # the safetensors errors have no common base class
            raise ValueError(f"{path}: cannot read safetensors: {err}") from err
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"{self.path}: missing tensor {name} (expected shape {list(shape)})")
        arr = self.arrays[name]
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"{self.path}: tensor {name} has shape {list(arr.shape)}, expected {list(shape)}"
            )
        self.used.add(name)
        return arr

    def check_all_used(self) -> None:
        extra = sorted(set(self.arrays) - self.used)
        if extra:
            raise ValueError(f"{self.path}: unexpected tensor(s) {', '.join(extra)}")


def _split(weight: np.ndarray, d: int) -> dict:
    """[E, 2D] (torch weight over concat(llm_state, s)) -> w_llm [E, D], w_rnn [E, D]."""
    return {"w_llm": weight[:, :d], "w_rnn": weight[:, d:]}


def load_reference(folder, reference_logits: bool = True, vocab_map=None, dtype=jnp.float32):
    """Load a reference drafter folder -> (DrafterConfig, params).

    reference_logits: reproduce the reference's logits warp (default, for parity).
    vocab_map: optional [K] target ids; keeps only those LM-head rows (a reduced draft vocabulary,
        which then needs the same vocab_map in TargetEmbeddings).
    Errors name the file and the field or tensor.
    """
    folder = Path(folder)
    k = None if vocab_map is None else int(np.asarray(vocab_map).shape[0])
    config = _read_config(folder / CONFIG_FILE, reference_logits, k)
    t = _Tensors(folder / WEIGHTS_FILE)
    d, e, v, n = config.hidden_size, config.exit_dim, config.vocab_size, config.num_draft_layers
    params: dict = {
        "rnn": {
            "w": t.take("rnn_w.weight", (d, d)),
            "u": t.take("rnn_u.weight", (d, d)),
            "b": t.take("rnn_u.bias", (d,)),
        }
    }
    if config.has_input_proj:
        params["input_proj"] = _split(t.take("input_proj.weight", (e, 2 * d)), d)
        params["input_proj"]["b"] = t.take("input_proj.bias", (e,))
    blocks = []
    for i in range(n):
        w = t.take(f"lm_head.{i}.linear.weight", (e, e))
        block = _split(w, d) if i == 0 and not config.has_input_proj else {"w": w}
        block["b"] = t.take(f"lm_head.{i}.linear.bias", (e,))
        blocks.append(block)
    params["res_blocks"] = blocks
    head = t.take(f"lm_head.{n}.weight", (v, e))
    if vocab_map is not None:
        head = head[np.asarray(vocab_map)]
    params["lm_head"] = head
    t.check_all_used()
    params = _to_jax(params, dtype)
    return config, params


def _to_jax(tree, dtype):
    if isinstance(tree, dict):
        return {key: _to_jax(val, dtype) for key, val in tree.items()}
    if isinstance(tree, list):
        return [_to_jax(val, dtype) for val in tree]
    return jnp.asarray(np.ascontiguousarray(tree), dtype)


def save_reference(folder, config: DrafterConfig, params: dict) -> None:
    """Write params in the reference's format (full vocabulary, untied head only)."""
    if config.tie_lm_head or config.draft_vocab_size is not None:
        raise ValueError("save_reference: the reference format has no tied head or reduced vocab")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    merge = lambda layer: f32(np.concatenate([layer["w_llm"], layer["w_rnn"]], axis=1))
    out = {
        "rnn_w.weight": f32(params["rnn"]["w"]),
        "rnn_u.weight": f32(params["rnn"]["u"]),
        "rnn_u.bias": f32(params["rnn"]["b"]),
    }
    if config.has_input_proj:
        out["input_proj.weight"] = merge(params["input_proj"])
        out["input_proj.bias"] = f32(params["input_proj"]["b"])
    for i, block in enumerate(params["res_blocks"]):
        w = merge(block) if i == 0 and not config.has_input_proj else f32(block["w"])
        out[f"lm_head.{i}.linear.weight"] = w
        out[f"lm_head.{i}.linear.bias"] = f32(block["b"])
    out[f"lm_head.{config.num_draft_layers}.weight"] = f32(params["lm_head"])
    save_file(out, str(folder / WEIGHTS_FILE))
    fields = {key: getattr(config, key) for key in _CONFIG_KEYS}
    meta = {"model_type": "recurrent_drafting_drafter", "rnn": True, **fields}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
