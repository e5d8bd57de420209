"""`specdraft train`: train a drafter for a target LLM by self-distillation, resumably.

    specdraft train --out runs/drafter-smollm2 --export pipeline/assets/drafter-smollm2

1. The LLM answers the shipped prompts (pipeline/data); answers and hidden states are cached as
   `.npz` chunks under OUT/data (see pipeline.distill).
2. The drafter trains on windows of that data with a jitted step, the batch split over the local
   devices. An orbax CheckpointManager under OUT/checkpoints saves the train state every
   `--save-every` steps (keeping `--keep`), with the run's settings as JSON beside the arrays.
   Killing the command and running it again continues from the last saved step; batches and
   keys are functions of the step number, so the result equals an uninterrupted run's.
3. Greedy acceptance on the held-out prompts (pipeline.distill_eval) is measured, and the drafter
   exported as a drafter folder (pipeline.drafter_io) with the figures in its drafter.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.distill import GenerationSettings
from pipeline.train_run import RunSpec, fit

DEFAULT_OUT = "runs/drafter-smollm2"


EVAL_BEAMS = ("1x1", "1x2", "1x3", "2x3", "2x4", "4x4", "8x4", "4x8t")


def _beam(text: str):
    """ "2x3" -> BeamConfig(2, 3), as an argparse type."""
    from drafter.config import BeamConfig

    try:
        return BeamConfig.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _at_least(low: int):
    """An argparse type: an int >= low, else a usage error naming the value (before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--model", default=None, help="target .gguf or HF folder (default: the fetched SmolLM2)")
    a("--out", default=DEFAULT_OUT, help="run folder: data cache, checkpoints, eval.json")
    a("--export", default=None, help="drafter folder to write at the end (default OUT/drafter)")
    a("--steps", type=_at_least(1), default=RunSpec.steps, help="optimizer steps")
    a(
        "--batch",
        type=_at_least(1),
        default=RunSpec.batch,
        help="windows per step (a multiple of the device count)",
    )
    a(
        "--lr",
        type=float,
        default=RunSpec.learning_rate,
        help="peak learning rate (warmup + cosine)",
    )
    a("--warmup", type=_at_least(0), default=RunSpec.warmup, help="warmup steps")
    a("--weight-decay", type=float, default=RunSpec.weight_decay, help="AdamW weight decay")
    a(
        "--kl-weight",
        type=float,
        default=RunSpec.kl_weight,
        help="weight of KL(LLM || drafter) beside the CE",
    )
    a("--state-noise", type=float, default=RunSpec.state_noise,
      help="train-time Gaussian noise on the LLM state, as a fraction of its RMS")  # fmt: skip
    a("--width", type=_at_least(1), default=RunSpec.width, help="beam width W for evaluation")
    a("--length", type=_at_least(1), default=RunSpec.length, help="draft length L (train and eval)")
    a("--eval-beams", nargs="*", type=_beam, default=[_beam(x) for x in EVAL_BEAMS],
      metavar="WxL", help="further (W, L) to evaluate on the held-out prompts, recorded in "
      f"drafter.json's eval_grid (default: {' '.join(EVAL_BEAMS)}; none: the flag alone)",
      )  # fmt: skip
    a("--layers", type=_at_least(0), default=RunSpec.num_draft_layers, help="drafter ResBlocks")
    a(
        "--exit-dim",
        type=_at_least(1),
        default=None,
        help="ResBlock width (default: D when tied, else 2D)",
    )
    a("--tie-head", action=argparse.BooleanOptionalAction, default=True,
      help="use the LLM's output table as the drafter's LM head (a few MB drafter)")  # fmt: skip
    a("--draft-vocab", type=_at_least(0), default=RunSpec.draft_vocab_size,
      help="K: draft over the K most frequent answer tokens; 0 = the full vocabulary")  # fmt: skip
    a("--train-file", default=None, metavar="FILE",
      help="training prompts, JSONL or text as for `specdraft generate --prompts` "
      "(default: the shipped pipeline/data/train_prompts.jsonl)")  # fmt: skip
    a("--heldout-file", default=None, metavar="FILE",
      help="held-out prompts for the evaluation, none of them a training prompt "
      "(default: the shipped pipeline/data/heldout_prompts.jsonl)")  # fmt: skip
    a(
        "--train-prompts",
        type=_at_least(1),
        default=None,
        help="use only the first N training prompts",
    )
    a(
        "--heldout-prompts",
        type=_at_least(1),
        default=None,
        help="use only the first N held-out prompts",
    )
    a(
        "--max-new-tokens",
        type=_at_least(1),
        default=128,
        help="answer length cap when generating data",
    )
    a("--temperature", type=float, default=0.0, help="LLM temperature for the answers")
    a("--gen-batch", type=_at_least(1), default=GenerationSettings.chunk_size,
      help="prompts the LLM answers per batch when generating data (one cached chunk each)",
      )  # fmt: skip
    a("--seed", type=int, default=0, help="drafter init and data order")
    a("--save-every", type=_at_least(1), default=100, help="checkpoint period in steps")
    a("--keep", type=_at_least(1), default=3, help="checkpoints to keep")
    a("--devices", type=_at_least(1), default=None, help="local devices to use (default: all)")


def _spec(args, llm_config) -> RunSpec:
    d = llm_config.hidden_size
    exit_dim = args.exit_dim or (d if args.tie_head else 2 * d)
    return RunSpec(
        steps=args.steps,
        batch=args.batch,
        learning_rate=args.lr,
        warmup=min(args.warmup, args.steps),
        weight_decay=args.weight_decay,
        kl_weight=args.kl_weight,
        state_noise=args.state_noise,
        width=args.width,
        length=args.length,
        num_draft_layers=args.layers,
        exit_dim=exit_dim,
        tie_lm_head=args.tie_head,
        draft_vocab_size=args.draft_vocab or None,
        seed=args.seed,
        save_every=args.save_every,
        keep=args.keep,
    )


def _load_llm(model):
    from pipeline.models import require_model
    from pipeline.tokenizer import Tokenizer
    from pipeline.weights import load_model

    path = require_model(model)
    config, params = load_model(path)
    tokenizer = Tokenizer.from_gguf(path) if path.is_file() else None
    if tokenizer is None:
        tokenizer = Tokenizer.from_tokenizer_json(path / "tokenizer.json")
    return path, config, params, tokenizer


def _fail(err: Exception) -> int:
    # An error the user can fix: no traceback (pipeline does not import the cluster CLI).
    print(f"specdraft train: error: {err}", file=sys.stderr)
    return 2


def run(args) -> int:
    from pipeline import distill
    from pipeline.drafter_io import DrafterCheckpointError
    from pipeline.outputs import OutputPathError, check_writable
    from pipeline.prompts import PromptFileError

    t0 = time.time()
    files = (Path(args.train_file or distill.TRAIN_PROMPTS),
             Path(args.heldout_file or distill.HELDOUT_PROMPTS))  # fmt: skip
    try:  # the prompt files first: a bad one is named before minutes of model loading
        splits = distill.read_splits(files, (args.train_prompts, args.heldout_prompts))
        check_writable(args.out, "--out", folder=True)
        if args.export:
            check_writable(args.export, "--export", folder=True)
    except (PromptFileError, OutputPathError) as err:
        return _fail(err)
    # Hashed now, as read: the record must describe these prompts even if a file changes later.
    digests = [hashlib.sha256(file.read_bytes()).hexdigest()[:16] for file in files]
    for name, skipped in splits["skipped"].items():
        for record in skipped:
            print(f"skipping {name} prompt {record['id']!r}: {record['error']}", file=sys.stderr)
    try:
        path, config, params, tokenizer = _load_llm(args.model)
    except FileNotFoundError as err:
        return _fail(err)
    out = Path(args.out)
    settings = distill.GenerationSettings(
        args.max_new_tokens, args.temperature, chunk_size=args.gen_batch
    )
    bars = lambda total, desc: tqdm(total=total, desc=f"answering {desc} prompts").update
    try:
        train, heldout = distill.prepare_data(
            (params, config, tokenizer), path, out / "data", settings, splits, bars
        )
    except ValueError as err:  # answers cached for other prompts or settings
        print(file=sys.stderr)  # end the progress bar's line
        return _fail(err)
    print(f"data: {len(train.answer)} train tokens, {len(heldout.answer)} held-out tokens "
          f"({time.time() - t0:.0f} s so far)")  # fmt: skip
    spec = _spec(args, config)
    try:
        result = fit(spec, (params, config, path.name), train, heldout, out, devices=args.devices,
                     eval_beams=tuple(args.eval_beams))  # fmt: skip
    except (DrafterCheckpointError, ValueError) as err:
        return _fail(err)
    export = Path(args.export) if args.export else out / "drafter"
    data = {"train_tokens": int(len(train.answer)), "heldout_tokens": int(len(heldout.answer))}
    flags = (args.train_file, args.heldout_file)
    for name, flag, file, digest in zip(("train", "heldout"), flags, files, digests, strict=True):
        data[f"{name}_file"] = flag or f"pipeline/data/{file.name}"  # the shipped file
        data[f"{name}_file_sha256"] = digest
        data[f"{name}_prompts"] = len(splits[name])
    info = {**result.info, "data": data, "wall_seconds_total": round(time.time() - t0, 1)}
    from pipeline.drafter_io import save_drafter

    save_drafter(export, result.config, result.params, result.vocab_map, info)
    (out / "eval.json").write_text(json.dumps(info, indent=2) + "\n")
    ev = info["eval"]
    print(f"held-out greedy acceptance (W={spec.width}, L={spec.length}): "
          f"{ev['mean_tokens_per_call']:.3f} tokens per LLM call; per depth "
          f"{np.round(ev['per_depth_acceptance'], 3).tolist()}")  # fmt: skip
    for ev in info.get("eval_grid", []):
        w, n = ev["beam"]["width"], ev["beam"]["length"]
        kind = "".join(f", {k}" for k in ("per_root", "tree") if ev["beam"].get(k))
        print(f"  W={w}, L={n}{kind}: {ev['mean_tokens_per_call']:.3f} tokens per LLM call")
    print(f"drafter written to {export} ({time.time() - t0:.0f} s total)")
    return 0
