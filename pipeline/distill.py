"""Self-distillation data: the target LLM answers the shipped prompts; we keep its tokens, states.

A `DistillData` holds, for every answered prompt, the answer tokens `x_P .. x_{P+A-1}` (the LLM's
own generation, EOS included when it stopped) and the LLM hidden states (after the final norm) at
positions `P-1 .. P+A-2`, i.e. `hidden[j]` is the state from which the LLM produced `answer[j]`.
The generation loop collects them as it decodes (`generate(..., collect_states=True)`), which
costs nothing extra; a separate forward over prompt + answer (`hidden_states`, what the engine's
prefill/verify passes compute) agrees to float noise, as a test checks.

Generation is slow on a CPU, so the data set is built in chunks of prompts, each cached as an
`.npz` under the output folder together with a fingerprint of what produced it (model file,
prompts, generation settings): an interrupted run resumes at the first missing chunk, and a
changed setting is an error instead of silently mixing data sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from drafter.train import Window

DATA_DIR = Path(__file__).parent / "data"
TRAIN_PROMPTS = DATA_DIR / "train_prompts.jsonl"
HELDOUT_PROMPTS = DATA_DIR / "heldout_prompts.jsonl"


@dataclass(frozen=True)
class DistillData:
    """Answers of S prompts, concatenated: N = sum of answer lengths.

    answer: [N] int32 target ids; hidden: [N, D] float16; offsets: [S+1] int64 (answer s is
    `answer[offsets[s]:offsets[s+1]]`).
    """

    answer: np.ndarray
    hidden: np.ndarray
    offsets: np.ndarray

    def __post_init__(self):
        n = self.answer.shape[0]
        if self.hidden.shape[0] != n or self.offsets[-1] != n or self.offsets[0] != 0:
            raise ValueError(
                f"DistillData: answer [{n}], hidden {self.hidden.shape} and offsets ending at "
                f"{self.offsets[-1]} disagree"
            )

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[s], self.offsets[s + 1]
        return self.answer[lo:hi], self.hidden[lo:hi]


def concat(parts: list[DistillData]) -> DistillData:
    if not parts:
        return DistillData(np.zeros((0,), np.int32), np.zeros((0, 0), np.float16), np.zeros(1, int))
    lengths = np.concatenate([p.lengths() for p in parts])
    return DistillData(
        np.concatenate([p.answer for p in parts]),
        np.concatenate([p.hidden for p in parts]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


def save_npz(path: Path, data: DistillData, fingerprint: dict) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        answer=data.answer,
        hidden=data.hidden,
        offsets=data.offsets,
        fingerprint=json.dumps(fingerprint, sort_keys=True),
    )
    tmp.replace(path)  # atomic: a killed run never leaves a half-written chunk


def load_npz(path: Path, fingerprint: dict) -> DistillData:
    with np.load(path) as f:
        stored = json.loads(str(f["fingerprint"]))
        if stored != fingerprint:
            keys = sorted(set(stored) | set(fingerprint), key=str)
            diff = ", ".join(
                f"{k} {stored.get(k)!r} (now {fingerprint.get(k)!r})"
                for k in keys
                if stored.get(k) != fingerprint.get(k)
            )
            raise ValueError(
                f"{path}: cached data was made with other prompts or settings: {diff}; "
                "delete it or choose another output folder"
            )
        return DistillData(f["answer"], f["hidden"], f["offsets"])


def window_starts(data: DistillData) -> np.ndarray:
    """[M] int64 flat indices j whose window has at least one label (answer[j+1] exists)."""
    bounds = zip(data.offsets[:-1], data.offsets[1:], strict=True)
    starts = [np.arange(lo, hi - 1) for lo, hi in bounds]
    return np.concatenate(starts) if starts else np.zeros((0,), np.int64)


def gather_windows(data: DistillData, starts: np.ndarray, length: int, teacher: bool) -> Window:
    """[B] flat indices -> Window batch (numpy): llm_state [B, D] f32, tokens [B, L+1],
    mask [B, L], teacher_hidden [B, L, D] (the states that produced the L labels) or None.
    Positions past an answer's end are masked."""
    seq = np.searchsorted(data.offsets, starts, side="right") - 1
    end = data.offsets[seq + 1]
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    inside = idx < end[:, None]
    safe = np.where(inside, idx, starts[:, None])
    tokens = np.where(inside, data.answer[safe], 0).astype(np.int32)
    # Label k is answer[j+1+k], which the LLM produced from hidden[j+1+k].
    teacher_hidden = data.hidden[safe[:, 1:]].astype(np.float32) if teacher else None
    return Window(data.hidden[starts].astype(np.float32), tokens, inside[:, 1:], teacher_hidden)


def batch_indices(num_windows: int, batch: int, step: int, seed: int) -> np.ndarray:
    """[batch] window indices for `step`: epoch-wise shuffles derived from (seed, epoch) only, so
    a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = num_windows // batch
    if per_epoch < 1:
        raise ValueError(
            f"need at least {batch} training windows for batch {batch}, have {num_windows}"
        )
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_windows)
    return order[k * batch : (k + 1) * batch]


def token_frequency_vocab(data: DistillData, k: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """[K] int32: the K target ids most frequent in the answers (ties by id), `always` included
    (e.g. EOS ids), sorted by id so the map is canonical."""
    counts = np.bincount(
        data.answer, minlength=max(int(data.answer.max()) + 1, max(always, default=0) + 1)
    )
    counts = counts.astype(np.float64)
    counts[list(always)] = np.inf
    order = np.lexsort((np.arange(len(counts)), -counts))
    chosen = order[:k]
    if len(chosen) < k:  # fewer distinct ids than K: pad with the lowest unused ids
        unused = np.setdiff1d(np.arange(k + len(chosen)), chosen)
        chosen = np.concatenate([chosen, unused[: k - len(chosen)]])
    return np.sort(chosen).astype(np.int32)


def fingerprint_of(model_path, settings: dict) -> dict:
    """What a cached chunk depends on besides its prompts: the model file and the settings."""
    model = Path(model_path)
    size = model.stat().st_size if model.exists() else None
    # data_version 2: states collected by the decode loop (1: a second forward pass).
    return {"model": model.name, "model_bytes": size, "data_version": 2, **settings}


def _ids_digest(prompt_ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]


def hidden_states(llm_params, llm_config, tokens, lengths):
    """[B, T] right-padded prompt+answer ids, [B] lengths -> [B, T, D] hidden after the final norm.

    One forward with an empty cache (S = 0): the same causal pass the engine's prefill runs.
    """
    from pipeline import llm

    b, t = tokens.shape
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    cache = llm.init_cache(llm_config, b, 0)
    mask = llm.causal_mask(cache.lengths, 0, t, valid)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _, _ = llm.forward_hidden(llm_params, llm_config, tokens, positions, cache, mask)
    return hidden


@dataclass(frozen=True)
class GenerationSettings:
    """How the LLM answers the prompts. temperature 0 is greedy (the default: the engine's greedy
    decode is what the drafter must predict)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    # Prompts answered per batch. Answering the first 128 training prompts (13,910 answer tokens)
    # on the 2-core CPU ran at 149 tok/s in chunks of 32, 193 in chunks of 64 and 212 in one
    # chunk of 128, the same tokens (README). The KV cache grows with it: 128 rows of 128-token
    # prompts plus 128 answer tokens hold about 1.5 GB in fp32.
    chunk_size: int = 128
    system_prompt: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def encode_prompts(tokenizer, items) -> list[list[int]]:
    """PromptItems -> token ids of their chat prompts (as the engine renders them)."""
    return [tokenizer.encode_chat(item.chat_messages) for item in items]


def _right_pad(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def answer_chunk(llm_params, llm_config, prompt_ids, row_ids, settings: GenerationSettings):
    """Answer up to `chunk_size` prompts (token id lists) -> DistillData of their answers.

    The batch is padded to `chunk_size` rows and the prompt width to a multiple of 32, so every
    chunk reuses one compiled generate. The decode loop hands back the hidden state each answer
    token was drawn from, so no second pass over prompt + answer is needed.
    """
    from drafter.sampling import SamplingConfig
    from pipeline.generate import generate

    n, b = len(prompt_ids), settings.chunk_size
    rows = list(prompt_ids) + [prompt_ids[-1]] * (b - n)
    ids = list(row_ids) + [row_ids[-1]] * (b - n)
    plen = np.array([len(r) for r in rows], np.int32)
    width = int(-(-plen.max() // 32) * 32)
    sampling = SamplingConfig(temperature=settings.temperature)
    key = jax.random.key(settings.seed)
    gen = generate(
        llm_params, llm_config, _right_pad(rows, width), plen, sampling, key,
        settings.max_new_tokens, row_ids=np.asarray(ids, np.int32), collect_states=True,
    )  # fmt: skip
    gen_tokens, gen_len = np.asarray(gen.tokens), np.asarray(gen.lengths)
    gen_states = np.asarray(gen.states)
    answers = [gen_tokens[i, : gen_len[i]].astype(np.int32) for i in range(n)]
    states = [gen_states[i, : gen_len[i]].astype(np.float16) for i in range(n)]
    lengths = [len(a) for a in answers]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return DistillData(np.concatenate(answers), np.concatenate(states), offsets)


def build_split(llm, items, out_dir, name: str, settings: GenerationSettings, fingerprint: dict,
                progress=None) -> DistillData:  # fmt: skip
    """Answer every PromptItem of one split, chunk by chunk, caching each chunk in `out_dir`.

    llm: (params, config, tokenizer). A chunk already on disk with the same fingerprint is loaded,
    not regenerated; `progress(n)` is told how many prompts each chunk covered.
    """
    params, config, tokenizer = llm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt_ids = encode_prompts(tokenizer, items)
    parts = []
    for lo in range(0, len(items), settings.chunk_size):
        hi = min(lo + settings.chunk_size, len(items))
        path = out_dir / f"{name}-{lo:05d}.npz"
        # Keyed by the chunk's own prompts, so appending prompts to a file keeps earlier chunks.
        chunk_print = {**fingerprint, "prompts_sha256": _ids_digest(prompt_ids[lo:hi])}
        if path.exists():
            parts.append(load_npz(path, chunk_print))
        else:
            part = answer_chunk(params, config, prompt_ids[lo:hi], range(lo, hi), settings)
            save_npz(path, part, chunk_print)
            parts.append(part)
        if progress is not None:
            progress(hi - lo)
    return concat(parts)


def read_splits(files=(TRAIN_PROMPTS, HELDOUT_PROMPTS), limits=(None, None)) -> dict:
    """{"train": [PromptItem], "heldout": [PromptItem]} from two prompt files (the shipped ones by
    default; JSONL or plain text, see pipeline.prompts), the first `limit` prompts of each.

    Raises PromptFileError (naming file and line) for a malformed file, and for a held-out prompt
    that is also a training prompt: the held-out figures would then measure memorisation.
    Empty prompts are skipped; each split's `skipped` list says which (id and line).
    """
    from pipeline.prompts import PromptFileError, read_prompts

    splits, skipped = {}, {}
    for name, file, limit in zip(("train", "heldout"), files, limits, strict=True):
        read = read_prompts(file)
        splits[name], skipped[name] = read.items[:limit], read.errors
        if not splits[name]:
            raise PromptFileError(f"{file}: no non-empty prompts for the {name} split")
    # Compared as the chats the LLM sees: a plain prompt equals the same text as one user turn.
    key = lambda item: json.dumps(item.chat_messages, sort_keys=True)
    seen = {key(item): item.id for item in splits["train"]}
    for item in splits["heldout"]:
        if key(item) in seen:
            raise PromptFileError(
                f"{files[1]}: held-out prompt {item.id!r} is also training prompt "
                f"{seen[key(item)]!r} of {files[0]}; held-out prompts must be unseen"
            )
    return {**splits, "skipped": skipped}


def prepare_data(llm, model_path, out_dir, settings: GenerationSettings, splits: dict,
                 progress_factory=None) -> tuple[DistillData, DistillData]:  # fmt: skip
    """(train, held-out) DistillData for the prompts of `read_splits`, cached under `out_dir`.

    progress_factory(total, desc) -> callable(n), e.g. a tqdm's `update`.
    """
    fingerprint = fingerprint_of(model_path, settings.as_dict())
    out = []
    for name in ("train", "heldout"):
        items = splits[name]
        progress = progress_factory(len(items), name) if progress_factory else None
        out.append(build_split(llm, items, out_dir, name, settings, fingerprint, progress))
    return out[0], out[1]
