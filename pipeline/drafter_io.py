"""A trained drafter on disk: a `pipeline.checkpoint` folder plus a JSON description beside it.

Layout of a drafter folder (what `specdraft train` exports and what ships in
`pipeline/assets/drafter-smollm2/`):

    config.json    the DrafterConfig (pipeline.checkpoint's format)
    params/        orbax tree {"params": drafter params, "vocab_map": [K] int32 (iff reduced)}
    drafter.json   {"format": 1, "llm": {"vocab_size", "hidden_size", "model"}, "train": {...},
                    "eval": {...}}: what it was made for and how it was made and measured

The reduced vocabulary map is drafter data (chosen from the training answers), so it lives in the
checkpoint, but it is not a trained parameter: the engine passes it in `TargetEmbeddings`.
A drafter trained for another LLM (vocabulary or hidden size differ) is refused with both shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drafter.config import DrafterConfig
from drafter.model import TargetEmbeddings
from pipeline.checkpoint import CheckpointError, load_config, restore_checkpoint, save_checkpoint

FORMAT = 1
INFO_FILE = "drafter.json"
DEFAULT_DRAFTER = Path(__file__).parent / "assets" / "drafter-smollm2"


class DrafterCheckpointError(ValueError):
    """A drafter folder that is missing, malformed, or made for another LLM."""


class LoadedDrafter(NamedTuple):
    """config, params (dict pytree), vocab_map [K] int32 | None, info (the drafter.json dict)."""

    config: DrafterConfig
    params: Any
    vocab_map: Any
    info: dict


def check_fits(config: DrafterConfig, llm_vocab: int, llm_hidden: int, where: str) -> None:
    """Raise DrafterCheckpointError unless the drafter was made for an LLM of these shapes."""
    if (config.vocab_size, config.hidden_size) != (llm_vocab, llm_hidden):
        raise DrafterCheckpointError(
            f"{where}: drafter made for an LLM with vocab_size={config.vocab_size}, "
            f"hidden_size={config.hidden_size}, but the chosen LLM has vocab_size={llm_vocab}, "
            f"hidden_size={llm_hidden}; train a drafter for this model (`specdraft train`)"
        )


def save_drafter(path, config: DrafterConfig, params, vocab_map=None, info=None) -> Path:
    """Write a drafter folder (replacing one that is there). Returns the folder."""
    arrays = {"params": jax.device_get(params)}
    if vocab_map is not None:
        arrays["vocab_map"] = np.asarray(vocab_map, np.int32)
    path = save_checkpoint(path, arrays, config, overwrite=True)
    doc = {"format": FORMAT, **(info or {})}
    (path / INFO_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_info(path) -> dict:
    """The drafter.json of a drafter folder ({} if the folder has none)."""
    where = Path(path) / INFO_FILE
    if not where.is_file():
        return {}
    try:
        return json.loads(where.read_text())
    except json.JSONDecodeError as err:
        raise DrafterCheckpointError(f"{where}: not JSON: {err}") from err


def require_drafter_folder(path) -> Path:
    """The absolute drafter folder, or a DrafterCheckpointError naming it and how to make one.

    Cheap (no reads), so callers can check before loading a model."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise DrafterCheckpointError(
            f"drafter folder {path} not found; give an existing one (the shipped drafter is "
            f"{DEFAULT_DRAFTER}) or train one with `specdraft train --export {path}`"
        )
    return path


def load_drafter(path=None, llm_config=None, sharding=None) -> LoadedDrafter:
    """Load a drafter folder (default: the shipped SmolLM2 drafter), checked against the LLM.

    llm_config: anything with `vocab_size` and `hidden_size` (a LlamaConfig), or None to skip the
    check. sharding: a jax Sharding to place every array on (e.g. replicated over a mesh).
    """
    path = require_drafter_folder(DEFAULT_DRAFTER if path is None else path)
    try:
        config = load_config(path, DrafterConfig)
        if llm_config is not None:
            check_fits(config, llm_config.vocab_size, llm_config.hidden_size, str(path))
        _, arrays = restore_checkpoint(path, DrafterConfig, sharding=sharding)
    except CheckpointError as err:
        raise DrafterCheckpointError(str(err)) from None
    vocab_map = arrays.get("vocab_map")
    k = config.draft_vocab_size
    if (vocab_map is None) != (k is None) or (k is not None and vocab_map.shape != (k,)):
        got = None if vocab_map is None else vocab_map.shape
        raise DrafterCheckpointError(
            f"{path}: draft_vocab_size={k} but the stored vocab_map has shape {got}"
        )
    return LoadedDrafter(config, arrays["params"], vocab_map, read_info(path))


def target_embeddings(llm_params: dict, config: DrafterConfig, vocab_map=None) -> TargetEmbeddings:
    """The target's tables for this drafter from LLM params (pipeline.llm layout).

    The tied head is the LLM's output table: its untied `lm_head` if it has one, else `embed`.
    The tables are handed over in fp32 whatever the target's dtype: the drafter computes in fp32,
    as it was trained, and on the CPU a bf16 table made each one-row drafting matmul several
    times slower.
    """
    from pipeline import kernels

    def to_f32(table):
        if isinstance(table, kernels.QuantWeight):  # the head [D, V] in GGUF blocks
            return jnp.transpose(table.dequantized())
        return jnp.asarray(table, jnp.float32)

    embed = to_f32(llm_params["embed"])
    lm_head = None
    if config.tie_lm_head:
        lm_head = to_f32(llm_params["lm_head"]) if "lm_head" in llm_params else embed
    return TargetEmbeddings(embed, lm_head, vocab_map)
