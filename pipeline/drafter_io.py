"""A trained drafter on disk: orbax arrays plus a JSON description beside them.

Layout of a drafter folder (what `specdraft train` exports and what ships in
`pipeline/assets/drafter-smollm2/`):

    drafter.json   {"format": 1, "drafter_config": {...}, "llm": {"vocab_size", "hidden_size",
                    "model"}, "train": {...}, "eval": {...}}
    arrays/        orbax checkpoint of {"params": drafter params, "vocab_map": [K] (iff reduced)}

The reduced vocabulary map is drafter data (chosen from the training answers), so it lives in the
checkpoint, but it is not a trained parameter: the engine passes it in `TargetEmbeddings`.
A drafter trained for another LLM (vocabulary or hidden size differ) is refused with both shapes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from drafter.config import DrafterConfig
from drafter.model import TargetEmbeddings

FORMAT = 1
CONFIG_FILE = "drafter.json"
ARRAYS_DIR = "arrays"
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


def config_to_dict(config: DrafterConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict, where: str) -> DrafterConfig:
    names = {f.name for f in dataclasses.fields(DrafterConfig)}
    unknown = set(d) - names
    if unknown:
        raise DrafterCheckpointError(f"{where}: unknown drafter_config fields {sorted(unknown)}")
    try:
        return DrafterConfig(**d)
    except (TypeError, ValueError) as err:
        raise DrafterCheckpointError(f"{where}: bad drafter_config: {err}") from err


def save_drafter(path, config: DrafterConfig, params, vocab_map=None, info=None) -> Path:
    """Write a drafter folder (overwriting one that is there). Returns the folder."""
    path = Path(path).absolute()
    arrays = {"params": jax.device_get(params)}
    if vocab_map is not None:
        arrays["vocab_map"] = np.asarray(vocab_map, np.int32)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / ARRAYS_DIR, arrays, force=True)
    doc = {"format": FORMAT, "drafter_config": config_to_dict(config), **(info or {})}
    (path / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_info(path) -> tuple[DrafterConfig, dict]:
    """The drafter.json of a drafter folder: (config, whole dict)."""
    where = Path(path) / CONFIG_FILE
    if not where.is_file():
        raise DrafterCheckpointError(f"{where}: no drafter here (missing {CONFIG_FILE})")
    try:
        doc = json.loads(where.read_text())
    except json.JSONDecodeError as err:
        raise DrafterCheckpointError(f"{where}: not JSON: {err}") from err
    if doc.get("format") != FORMAT or "drafter_config" not in doc:
        raise DrafterCheckpointError(f"{where}: expected format {FORMAT} with drafter_config")
    return config_from_dict(doc["drafter_config"], str(where)), doc


def load_drafter(path=None, llm_config=None, sharding=None) -> LoadedDrafter:
    """Load a drafter folder (default: the shipped SmolLM2 drafter), checked against the LLM.

    llm_config: anything with `vocab_size` and `hidden_size` (a LlamaConfig), or None to skip the
    check. sharding: a jax Sharding to place every array on (e.g. replicated over a mesh).
    """
    path = Path(DEFAULT_DRAFTER if path is None else path).absolute()
    config, info = read_info(path)
    if llm_config is not None:
        check_fits(config, llm_config.vocab_size, llm_config.hidden_size, str(path))
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path / ARRAYS_DIR).item_metadata
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta
        )
        arrays = ckptr.restore(path / ARRAYS_DIR, abstract)
    vocab_map = arrays.get("vocab_map")
    if config.draft_vocab_size is not None and (
        vocab_map is None or vocab_map.shape != (config.draft_vocab_size,)
    ):
        raise DrafterCheckpointError(
            f"{path}: draft_vocab_size={config.draft_vocab_size} needs a vocab_map of that length"
        )
    return LoadedDrafter(config, arrays["params"], vocab_map, info)


def target_embeddings(llm_params: dict, config: DrafterConfig, vocab_map=None) -> TargetEmbeddings:
    """The target's tables for this drafter from LLM params (pipeline.llm layout).

    The tied head is the LLM's output table: its untied `lm_head` if it has one, else `embed`.
    """
    embed = llm_params["embed"]
    lm_head = llm_params.get("lm_head", embed) if config.tie_lm_head else None
    return TargetEmbeddings(embed, lm_head, vocab_map)
