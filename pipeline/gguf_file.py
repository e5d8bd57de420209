"""Opening GGUF files with errors that name the file and the tensor or metadata key.

Shared by the weight loader and the tokenizer, which both read one GGUF file. Parsing the
metadata of a real model takes seconds (tens of thousands of vocabulary strings), so the last
few readers are kept, keyed by path, size and modification time.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

_MISSING = object()


class ModelFileError(ValueError):
    """A model file (weights, config, tokenizer) that cannot be used; the message names the file
    and, where one is to blame, the tensor or field."""


class _CheckedReader(GGUFReader):
    """A GGUFReader that checks each tensor's data lies inside the file before mapping it, so a
    truncated file names the first tensor it cuts (the stock reader fails on a reshape)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
            except (ValueError, KeyError) as err:
                raise ModelFileError(f"tensor {name!r} has unknown type {raw_dtype[0]}") from err
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise ModelFileError(
                    f"tensor {name!r} ends at byte {end} but the file has {size} bytes (truncated?)"
                )
        super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A parsed GGUF file (memory-mapped tensors); ModelFileError if missing, corrupt or cut."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _open_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFReader:
    try:
        return _CheckedReader(path)
    except ModelFileError as err:
        raise ModelFileError(f"{path}: corrupt GGUF file: {err}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"{path}: corrupt or truncated GGUF file ({size} bytes): {type(err).__name__}: {err}"
        ) from None


def field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """Metadata value `key` as a Python value; ModelFileError naming file and key if absent."""
    entry = reader.fields.get(key)
    if entry is None:
        if default is _MISSING:
            raise ModelFileError(f"{reader.data.filename}: missing GGUF metadata field {key!r}")
        return default
    return entry.contents()


def eos_token_ids(reader: GGUFReader) -> tuple[int, ...]:
    """End tokens from metadata: end-of-sequence, end-of-turn and end-of-message, deduplicated."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    keys += ("tokenizer.ggml.eom_token_id",)
    ids = [field(reader, k, None) for k in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def bos_token_id(reader: GGUFReader) -> int | None:
    value = field(reader, "tokenizer.ggml.bos_token_id", None)
    return None if value is None else int(value)
