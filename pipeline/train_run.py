"""One resumable training run of a drafter on self-distillation data (behind `specdraft train`).

The run folder holds `checkpoints/<step>/` (orbax CheckpointManager): item `state` is the whole
`TrainState` (step, params, optimizer state) and item `run` the JSON record of the settings, the
LLM the drafter is made for and the reduced-vocabulary map. Resuming restores the latest step
straight onto the mesh (replicated) and checks that the record matches the current command: a
checkpoint made for another LLM (vocabulary or hidden size) or with other settings is an error.

Nothing in the loop depends on hidden host state: the batch of step `s` is a function of
(seed, s) (pipeline.distill.batch_indices) and training uses no randomness besides the initial
params (a function of the seed), so a killed and resumed run replays exactly the same updates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from drafter import train as dtrain
from drafter.config import BeamConfig, DrafterConfig
from drafter.model import init_params
from pipeline import distill
from pipeline.distill_eval import acceptance
from pipeline.drafter_io import DrafterCheckpointError, check_fits, target_embeddings
from sharding.mesh import batch_sharding, make_mesh, replicate, replicated


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a training run's result (besides the data).

    The defaults are the shipped SmolLM2 drafter's. `length` is the draft depth L trained (and
    the one beam evaluated first, at `width`); the engine may draft fewer steps than trained (its
    default is `EngineConfig.beam`), so `specdraft train --eval-beams` also reports other shapes.
    """

    steps: int = 8000
    batch: int = 128
    learning_rate: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.0
    kl_weight: float = 1.0
    state_noise: float = 0.3
    width: int = 1
    length: int = 4
    num_draft_layers: int = 1
    exit_dim: int | None = None
    tie_lm_head: bool = True
    draft_vocab_size: int | None = 8192
    seed: int = 0
    save_every: int = 100
    keep: int = 3

    def drafter_config(self, vocab_size: int, hidden_size: int) -> DrafterConfig:
        exit_dim = self.exit_dim or (hidden_size if self.tie_lm_head else 2 * hidden_size)
        k = self.draft_vocab_size
        return DrafterConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            exit_dim=exit_dim,
            num_draft_layers=self.num_draft_layers,
            tie_lm_head=self.tie_lm_head,
            draft_vocab_size=None if k is None or k >= vocab_size else k,
        )

    def train_config(self) -> dtrain.TrainConfig:
        return dtrain.TrainConfig(
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup,
            total_steps=self.steps,
            weight_decay=self.weight_decay,
            kl_weight=self.kl_weight,
            state_noise=self.state_noise,
        )


class FitResult(NamedTuple):
    config: DrafterConfig
    params: Any
    vocab_map: np.ndarray | None
    info: dict  # what drafter.json records: llm, train settings, eval figures, timings


# Settings that may change between a run and its resumption without changing its result.
RESUMABLE = ("save_every", "keep")


def _record(spec: RunSpec, config: DrafterConfig, llm_name: str, vocab_map) -> dict:
    digest = None
    if vocab_map is not None:
        digest = hashlib.sha256(np.asarray(vocab_map, np.int32).tobytes()).hexdigest()[:16]
    return {
        "llm": {
            "model": llm_name,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
        },  # fmt: skip
        "drafter_config": dataclasses.asdict(config),
        "spec": dataclasses.asdict(spec),
        "vocab_map_sha256": digest,
    }


def check_record(stored: dict, current: dict, where: str) -> None:
    """Refuse to resume a checkpoint that belongs to another LLM or other settings."""
    check_fits(
        DrafterConfig(**stored["drafter_config"]),
        current["llm"]["vocab_size"],
        current["llm"]["hidden_size"],
        where,
    )
    strip = lambda spec: {k: v for k, v in spec.items() if k not in RESUMABLE}
    for key in ("drafter_config", "vocab_map_sha256"):
        if stored.get(key) != current[key]:
            raise DrafterCheckpointError(
                f"{where}: {key} differs from this command's ({stored.get(key)} vs "
                f"{current[key]}); use another --out folder or the original settings"
            )
    old, new = strip(stored["spec"]), strip(current["spec"])
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in diff)
        raise DrafterCheckpointError(
            f"{where}: the checkpoints were made with other settings ({changes}); "
            "use another --out folder or the original settings"
        )


def open_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def restore_or_init(manager, record: dict, init_fn, sharding, where: str):
    """The latest saved TrainState placed by `sharding`, or `init_fn()` if there is none."""
    step = manager.latest_step()
    if step is None:
        return jax.device_put(init_fn(), sharding)
    stored = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    check_record(stored, record, f"{where}/{step}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(init_fn)
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    return restored["state"]


def save(manager, state, record: dict) -> None:
    step = int(state.step)
    if manager.latest_step() == step:
        return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(record))
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()


def _placed_windows(data, starts, spec: RunSpec, sharding):
    windows = distill.gather_windows(data, starts, spec.length, teacher=spec.kl_weight > 0)
    return jax.device_put(windows, sharding)


class _Speed:
    """Exponential averages of the loss and of label tokens per second, for the progress bar."""

    def __init__(self):
        self.loss, self.rate, self.last = None, None, time.perf_counter()

    def update(self, loss: float, tokens: int) -> dict:
        now = time.perf_counter()
        rate = tokens / max(now - self.last, 1e-9)
        self.last = now
        ema = lambda old, new: new if old is None else 0.9 * old + 0.1 * new
        self.loss, self.rate = ema(self.loss, loss), ema(self.rate, rate)
        return {"loss": f"{self.loss:.3f}", "tok/s": f"{self.rate:.0f}"}


def train_loop(spec, config, state, target, teacher_head, data, mesh, manager, record):
    """Run steps `state.step .. spec.steps`, saving every `save_every` and at the end."""
    tconfig = spec.train_config()
    optimizer = dtrain.make_optimizer(tconfig)
    rep, split = replicated(mesh), batch_sharding(mesh)
    step_fn = jax.jit(
        dtrain.make_train_step(config, tconfig, optimizer),
        in_shardings=(rep, rep, rep, split, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    starts = distill.window_starts(data)
    speed = _Speed()
    first = int(state.step)
    with tqdm(total=spec.steps, initial=first, desc="training", unit="step") as bar:
        for step in range(first, spec.steps):
            idx = distill.batch_indices(len(starts), spec.batch, step, spec.seed)
            windows = _placed_windows(data, starts[idx], spec, split)
            key = jax.random.fold_in(jax.random.key(spec.seed), step)
            state, metrics = step_fn(state, target, teacher_head, windows, key)
            bar.set_postfix(speed.update(float(metrics.loss), int(metrics.count.sum())))
            bar.update(1)
            if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
                save(manager, state, record)
    return state


def fit(spec: RunSpec, llm, train, heldout, out_dir, devices=None, eval_beams=()) -> FitResult:
    """Train (or resume) a drafter on `train`, evaluate it on `heldout`.

    llm: (params, LlamaConfig, model name). Returns the final params with the run's record; its
    `eval` is at (spec.width, spec.length), `eval_grid` at each further BeamConfig of
    `eval_beams` (what choosing an engine default needs).
    """
    llm_params, llm_config, llm_name = llm
    if train.hidden_size != llm_config.hidden_size:
        raise ValueError(
            f"training data has hidden size {train.hidden_size}, the LLM {llm_config.hidden_size}"
        )
    config = spec.drafter_config(llm_config.vocab_size, llm_config.hidden_size)
    vocab_map = None
    if config.draft_vocab_size is not None:
        vocab_map = distill.token_frequency_vocab(
            train, config.draft_vocab_size, tuple(llm_config.eos_token_ids)
        )
    mesh = make_mesh(devices)
    if spec.batch % mesh.size:
        raise ValueError(f"--batch {spec.batch} must be a multiple of the {mesh.size} devices")
    record = _record(spec, config, llm_name, vocab_map)
    target = replicate(target_embeddings(llm_params, config, vocab_map), mesh)
    teacher = None
    if spec.kl_weight > 0:
        teacher = replicate(llm_params.get("lm_head", llm_params["embed"]), mesh)
    optimizer = dtrain.make_optimizer(spec.train_config())
    init_fn = lambda: dtrain.init_state(
        init_params(config, jax.random.key(spec.seed)), optimizer
    )  # fmt: skip
    where = str(Path(out_dir) / "checkpoints")
    t0 = time.time()
    with open_manager(Path(where), spec.keep) as manager:
        state = restore_or_init(manager, record, init_fn, replicated(mesh), where)
        state = train_loop(spec, config, state, target, teacher, train, mesh, manager, record)
    train_seconds = time.time() - t0
    t1 = time.time()
    figures = acceptance(state.params, config, target, heldout, BeamConfig(spec.width, spec.length))
    grid = [acceptance(state.params, config, target, heldout, beam) for beam in eval_beams]
    info = {**record, "eval": figures, "train_seconds_this_process": round(train_seconds, 1),
            "eval_seconds": round(time.time() - t1, 1)}  # fmt: skip
    if grid:
        info["eval_grid"] = grid
    return FitResult(config, jax.device_get(state.params), vocab_map, info)
