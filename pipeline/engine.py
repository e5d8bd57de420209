"""The engine one Ray worker hosts: speculative decoding of a batch of prompts on local devices.

`Engine.from_config(EngineConfig)` loads the target (GGUF or HF folder), its tokenizer and the
drafter; `Engine.from_params(...)` wraps in-memory params (tiny random models in tests).
`engine.generate(items)` / `engine.draft(items)` take `PromptItem`s and return one dict per item:
`{"id", "text", "token_ids", "metrics"}` (or `{"id", "error"}`; `draft`: see `Engine.draft`).
Metrics:
- `llm_calls`: target forward passes for the row (prefill + verify steps while it was active);
  `steps`: the verify steps alone; `new_tokens`: generated tokens.
- `accepted_per_call`: mean tokens emitted per verify step, COUNTING THE BONUS TOKEN (accepted
  drafted tokens + 1), before cutting at EOS / max-new-tokens.
- `acceptance_per_depth[d]`: fraction of verify steps that accepted drafted token d+1.
- `drafted_per_call`: drafted-token slots verified per step (fewer than the tree's size where
  the policy drafted or verified less, `pipeline.policy`).
- `width`, `length`, `per_root`, `tree`, `cuts`: the draft tree (`EngineConfig.beam`);
  `steps_by_size`: the row's verify steps by drafted tokens verified ("0": autoregressive
  steps); `step_costs`: the table the policy chose by (`policy.StepCosts.as_dict`).
- `draft_ms`, `verify_ms`: one draft step and one tree-verify step of this batch, each timed
  alone (compiled, on the state after prefill, the median of 5 runs; once per batch shape);
  `tokens_per_s`: the batch's generated tokens over the wall time of the fused decode (whole
  batch); `compiled`: that call compiled first (the first batch of a shape), so its
  tokens_per_s includes it.
Row `i` draws with key `fold_in(seed, crc32(item id))`: a prompt's output does not depend on the
batch it is in, the padding, or the device count.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import zlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import NO_TOKEN
from drafter.model import init_params as init_drafter
from drafter.model import with_draft_head
from drafter.sampling import SamplingConfig
from pipeline import kernels
from pipeline import speculative as spec
from pipeline.generate import generate_core
from pipeline.llm import (
    PACKED_LAYER_KEYS,
    unstack_cache,
    unstack_layers,
    with_packed_weights,
    with_transposed_head,
)
from pipeline.policy import StepCosts
from pipeline.prompts import PromptItem
from sharding import make_mesh, replicate, shard_jit

DTYPES = ("float32", "bfloat16")  # what EngineConfig.dtype accepts
WEIGHTS = ("fp32", "native")  # what EngineConfig.weights accepts
DRAFT_METHODS = ("beam", "sample")  # what EngineConfig.draft_method accepts
MATMULS = ("auto", "kernel", "xla")  # what EngineConfig.matmul accepts
PROMPT_WIDTH_MULTIPLE = 32  # prompts are padded to a multiple of this: few distinct compilations


@dataclass(frozen=True)
class EngineConfig:
    """model: a .gguf file or HF folder (None: the default SmolLM2 from `specdraft fetch-model`).
    drafter: a drafter folder (None: the shipped one if present, else a freshly initialised,
    untrained drafter, with a warning). devices: local devices to shard the batch over (None:
    all)."""

    model: str | None = None
    drafter: str | None = None
    # The draft tree for every batch: a best-first tree of up to 8 drafted tokens from the top-4
    # children of each (`BeamConfig.tree`, 9 nodes), which each step may draft and verify at 1,
    # 2, 4 or 8 tokens or not at all (`adaptive`). On the 8 held-out bench prompts, one at a
    # time, the uncut tree emitted 2.35 tokens per call against 1.56 for (1, 1) (README).
    beam: BeamConfig = BeamConfig(width=4, length=8, tree=True, cuts=(1, 2, 4))
    # Prompt lookup (`drafter.lookup`): > 0 adds a candidate copied from the context after its
    # longest suffix n-gram of at most this many tokens that occurred before; 0 drafts with the
    # drafter alone. `lookup_in_place`: the copy replaces the last beam (when it matched at least
    # 2 tokens) instead of adding a candidate, so the verified tree keeps its size. The default,
    # in place at (1, 1), raised held-out tokens per call from 1.53 to 1.59 (64 prompts) at the
    # same loop cost: 1.36x AR against 1.31x at batch 1, 1.12x both at batch 8 (README).
    lookup: int = 4
    lookup_in_place: bool = True
    # How the drafter proposes: "beam", the reference's beam search over `beam` (or, with
    # `BeamConfig.tree`, the best-first tree); "sample", W independent samples from the drafter
    # at `sampling`'s temperature, top-k and top-p (the seed's `sample_seq` vmapped over W and the
    # batch; `speculative.SampledDraft`). Either way the target decides what is generated.
    draft_method: str = "beam"
    # False: plain autoregressive decoding on the same engine, batching and keys (no drafter):
    # `generate --no-draft`, the baseline a user compares with on their own prompts. Its output
    # is the speculative output, token for token, at any temperature (`pipeline.accept`).
    speculate: bool = True
    # `draft` records each drafted token's log-probability (under the distribution it was chosen
    # from) beside the tokens.
    draft_log_probs: bool = False
    sampling: SamplingConfig = SamplingConfig()
    max_new_tokens: int = 128
    devices: int | None = None
    batch_size: int = 8
    seed: int = 0
    time_phases: bool = True
    # The target's weights (the drafter and the KV cache stay fp32). bfloat16 halves the weights'
    # memory and keeps greedy decoding exact: activations enter each bf16 matmul as two bf16
    # parts (`pipeline.llm._split`), so products keep about fp32 accuracy (README, Benchmarks).
    dtype: str = "float32"
    # How a GGUF target's quantized matrices are held: "native" keeps the Q4_0, Q4_1 and Q8_0
    # ones in their blocks (`kernels.QuantWeight`: SmolLM2's weights in 112 MB against 538) and
    # multiplies them through the kernel, which expands each weight to the fp32 value "fp32"
    # dequantizes at load, so the two compute the same products, bit for bit (the same output).
    # A step reads a fifth of the bytes: plain decoding of one prompt ran 2.7x faster (README).
    # With a `dtype` other than float32 the weights are cast at load ("fp32" is taken).
    weights: str = "native"
    # Hold the target's output table a second time, transposed (`llm.with_transposed_head`), for
    # the few-row logits of a verify step: on the CPU that product is faster from a `[D, V]` table
    # (5 rows of SmolLM2's head: 5.4 against 7.1 ms), at the cost of a second copy of the table.
    # The drafter's head rows are held in both layouts regardless (`draft_params_for`).
    transposed_head: bool = True
    # With `transposed_head`: time one row through both layouts when the engine starts (about a
    # second) and serve one-row steps from the faster. On one 2-core CPU the stored [V, D] table
    # was faster (3.2 against 3.8 ms), on another (AMD Zen 4) the [D, V] copy (2.6 against 3.7
    # ms; a whole one-token forward 26.4 against 27.3 ms). False: [V, D] for one row.
    probe_head_layout: bool = True
    # Goodput-adaptive speculation (`pipeline.policy`): each step drafts and verifies the size of
    # `beam` (its cuts, its length, or none: an autoregressive step) with the most expected
    # tokens per second, by a table of step costs for the batch's rows measured on this machine
    # (`pipeline.tree_costs`, cached on disk; about 10-20 s a batch size the first time on a
    # 2-core CPU). False: `beam`'s linear cost model (`BeamConfig.node_cost`), always drafting.
    adaptive: bool = True
    # The target's few-row matmuls (decode and verify steps): "kernel" runs them through the
    # small-M CPU kernel (`pipeline.kernels`, built with the machine's g++ on first use; every
    # weight read once per call, a row's bits the same whatever rows share the call), "xla"
    # through XLA's dot, "auto" the kernel where it applies (the CPU, fp32, one device, a compiler
    # found) and XLA elsewhere, with a warning when only the compiler is missing.
    matmul: str = "auto"
    # With the kernel: the dtype the drafter's tied head rows (SmolLM2: 8192 x 576) are held in.
    # Drafting reads them once per drafted token, one row at a time, so the read is the cost;
    # bfloat16 halves it. Drafts only propose tokens (the target checks every one), so this
    # changes which tokens are proposed at most, never what is generated.
    draft_head_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.lookup, int) or self.lookup < 0:
            raise ValueError(f"EngineConfig.lookup must be an int >= 0, got {self.lookup!r}")
        if self.draft_method == "sample" and self.beam.tree:
            raise ValueError(
                f"EngineConfig.beam {self.beam} is a best-first tree; draft_method 'sample' "
                "draws W independent paths: give a W x L shape (BeamConfig(1, 4))"
            )
        if self.draft_method not in DRAFT_METHODS:
            raise ValueError(
                f"EngineConfig.draft_method must be one of {DRAFT_METHODS}, "
                f"got {self.draft_method!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"EngineConfig.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.weights == "native" and self.dtype != "float32":
            # The blocks expand to fp32; another dtype asks for the weights cast at load.
            object.__setattr__(self, "weights", "fp32")
        if self.matmul not in MATMULS:
            raise ValueError(f"EngineConfig.matmul must be one of {MATMULS}, got {self.matmul!r}")
        if self.draft_head_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                "EngineConfig.draft_head_dtype must be 'float32' or 'bfloat16', "
                f"got {self.draft_head_dtype!r}"
            )


def _matmul_path(config: EngineConfig, params, devices: int) -> str:
    """ "kernel" or "xla" for `EngineConfig.matmul` on these params and this many devices."""
    if config.matmul == "xla":
        return "xla"
    table = params.get("lm_head", params["embed"])
    dims_ok = table.shape[0] % kernels.PANEL == 0 and all(
        w.shape[-1] % kernels.PANEL == 0 for k, w in params["layers"][0].items()
        if k in PACKED_LAYER_KEYS
    )  # fmt: skip
    why = None
    if config.dtype != "float32":
        why = f"EngineConfig.dtype is {config.dtype} (the kernel is fp32)"
    elif devices != 1:
        why = f"the batch is sharded over {devices} devices (the kernel serves one)"
    elif jax.default_backend() != "cpu":
        why = f"the backend is {jax.default_backend()}"
    elif not dims_ok:
        why = f"a weight's output width is not a multiple of {kernels.PANEL}"
    elif not kernels.available():
        why = kernels.unavailable_reason()
        if config.matmul == "auto":
            warnings.warn(f"small-M matmul kernel unavailable, using XLA's dot: {why}",
                          stacklevel=3)  # fmt: skip
    if why is None:
        return "kernel"
    if config.matmul == "kernel":
        raise ValueError(f"EngineConfig.matmul is 'kernel' but {why}")
    return "xla"


def _quantized_head(params) -> bool:
    """Whether the output table is held in GGUF blocks (`EngineConfig.weights` "native")."""
    return isinstance(params.get("lm_head", params["embed"]), kernels.QuantWeight)


def _packed_drafter(params):
    """The drafter's [out, in] matrices as `kernels.PackedWeight`s (where out fits the kernel's
    panels); biases and everything else as they are."""

    def pack(w):
        fits = w.ndim == 2 and w.dtype == jnp.float32 and w.shape[0] % kernels.PANEL == 0
        return kernels.pack_rows(w) if fits else w

    return jax.tree.map(pack, params)


def row_id(item_id: str) -> int:
    """A stable per-prompt id for its PRNG stream (independent of batch position)."""
    return zlib.crc32(item_id.encode()) & 0x7FFFFFFF


def fresh_drafter(llm_config, seed: int = 0):
    """An untrained drafter sized for `llm_config` (low acceptance; output stays exact)."""
    d = llm_config.hidden_size
    config = DrafterConfig(hidden_size=d, vocab_size=llm_config.vocab_size, exit_dim=2 * d)
    return config, init_drafter(config, jax.random.key(seed))


class Engine:
    """Holds the target, the drafter and their compiled decode on a mesh of local devices."""

    def __init__(
        self,
        config: EngineConfig,
        llm_config,
        llm_params,
        drafter_config,
        drafter_params,
        vocab_map=None,
        tokenizer=None,
        drafter_source="given",
    ):
        from pipeline.drafter_io import target_embeddings

        self.config, self.llm_config, self.tokenizer = config, llm_config, tokenizer
        self.drafter_source = drafter_source
        self.mesh = make_mesh(config.devices)
        # Held per layer (`unstack_layers`, once, here): a jitted call given stacked layers
        # copies every layer's weights out of the stacked arrays on each call (0.5 GB for
        # SmolLM2 in fp32: a batch-1 call took 140 ms longer for a prompt alone and 420 ms for a
        # 48-token answer on the 2-core CPU, ad-hoc); per-layer arrays are read in place. Memory:
        # a second copy while the caller keeps the stacked one.
        held = unstack_layers(llm_params)
        self.matmul = _matmul_path(config, held, self.mesh.size)
        # ms of one row through the head from the [V, D] table and from the [D, V] copy, when
        # measured; the faster one serves one-row steps (AR decoding of one prompt).
        self.head_one_row_ms: tuple[float, float] | None = None
        if self.matmul == "kernel":
            held = with_packed_weights(held)
        elif config.transposed_head and not _quantized_head(held):
            one_row = False
            if config.probe_head_layout:
                from pipeline import tree_costs

                self.head_one_row_ms = tree_costs.head_one_row_ms(held)
                one_row = self.head_one_row_ms[1] < self.head_one_row_ms[0]
            held = with_transposed_head(held, one_row=one_row)
        self.llm_params = replicate(held, self.mesh)
        # The tied head's draft-vocabulary rows, gathered once here rather than on every step,
        # in two layouts: [K, D] for drafting one row (one prompt, one beam), [D, K] for several
        # (`with_draft_head`; `draft_params_for` picks).
        target = target_embeddings(llm_params, drafter_config, vocab_map)
        if self.matmul == "kernel":
            # The drafter's matrices and its head rows through the kernel too: one packed form
            # serves any number of rows (its layers apply a callable weight: `drafter.model.dense`).
            wide = with_draft_head(drafter_config, target, transposed=True)
            if wide.draft_head_t is not None:
                rows = kernels.pack_rows(wide.draft_head_t.T, jnp.dtype(config.draft_head_dtype))
                wide = wide._replace(draft_head_t=rows)
            packed = (_packed_drafter(drafter_params), wide)
            self.draft_params = self._draft_params_rows = replicate(packed, self.mesh)
        else:
            self.draft_params = replicate(
                (drafter_params, with_draft_head(drafter_config, target)), self.mesh
            )
            wide = with_draft_head(drafter_config, target, transposed=True)
            # Nothing to gather (an own head, or no reduced vocabulary): one layout serves all.
            self._draft_params_rows = (
                self.draft_params
                if wide is target
                else replicate((drafter_params, wide), self.mesh)
            )
        self.drafter_config = drafter_config  # draft functions per tree: `draft_fns`
        self.rule = spec.default_rule(config.sampling)
        self._generate = shard_jit(
            spec.generate_core, self.mesh, spec.GENERATE_BATCH, spec.GENERATE_STATIC
        )
        self._phase_ms: dict[tuple[int, int], tuple[float, float]] = {}
        self._costs: dict[int, StepCosts] = {}
        self._draft = shard_jit(spec.draft_core, self.mesh, spec.DRAFT_BATCH, spec.DRAFT_STATIC)
        self._generate_ar = shard_jit(_ar_core, self.mesh, (1, 2, 3, 5), (6, 7, 8, 9))

    @classmethod
    def from_params(
        cls,
        llm_config,
        llm_params,
        drafter_config=None,
        drafter_params=None,
        config: EngineConfig | None = None,
        tokenizer=None,
        vocab_map=None,
    ) -> Engine:
        """An engine over in-memory params; no drafter -> a fresh untrained one."""
        config = config or EngineConfig()
        source = "given"
        if drafter_params is None:
            drafter_config, drafter_params = fresh_drafter(llm_config, config.seed)
            source = "fresh (untrained)"
        return cls(
            config,
            llm_config,
            llm_params,
            drafter_config,
            drafter_params,
            vocab_map,
            tokenizer,
            source,
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        from pipeline.drafter_io import DEFAULT_DRAFTER, load_drafter, require_drafter_folder
        from pipeline.models import require_model
        from pipeline.tokenizer import Tokenizer
        from pipeline.weights import load_model

        path = require_model(config.model)
        if config.drafter is not None:
            require_drafter_folder(config.drafter)  # before the (slow) model load
        native = config.weights == "native"
        llm_config, llm_params = load_model(path, jnp.dtype(config.dtype), native)
        tokenizer = (
            Tokenizer.from_gguf(path)
            if path.is_file()
            else Tokenizer.from_tokenizer_json(path / "tokenizer.json")
        )
        drafter_path = config.drafter or (DEFAULT_DRAFTER if DEFAULT_DRAFTER.is_dir() else None)
        if drafter_path is None:
            warnings.warn(
                f"no drafter given and none shipped at {DEFAULT_DRAFTER}: using a freshly "
                "initialised, untrained drafter (exact output, low acceptance)",
                stacklevel=2,
            )
            return cls.from_params(llm_config, llm_params, config=config, tokenizer=tokenizer)
        loaded = load_drafter(drafter_path, llm_config)
        return cls(
            config,
            llm_config,
            llm_params,
            loaded.config,
            loaded.params,
            loaded.vocab_map,
            tokenizer,
            str(drafter_path),
        )

    # -- draft shapes --------------------------------------------------------------------------

    def beam_for(self, rows: int) -> BeamConfig:
        """The draft tree for a batch of `rows` prompts: `EngineConfig.beam` for every batch (the
        policy sizes each step, `costs_for`)."""
        return self.config.beam

    def costs_for(self, rows: int) -> StepCosts:
        """The policy's step costs for a batch of `rows` prompts (`EngineConfig.adaptive`):
        measured here, once per rows on one device (cached on disk), or the linear model."""
        beam = self.config.beam
        if not self.config.adaptive:
            return StepCosts.for_beam(beam)
        local = -(-rows // self.mesh.size)
        if local not in self._costs:
            from pipeline import tree_costs

            fn = self.draft_fns(beam)[1]
            sizes = beam.verify_sizes
            fns = spec.draft_fns_by_size(fn, sizes)
            nodes = tuple(1 + k for k in sizes) if beam.tree else (spec.draft_slots(fn) or
                                                                   beam.tree_nodes,)  # fmt: skip
            key = {"model": repr(self.llm_config), "drafter": repr(self.drafter_config),
                   "beam": str(beam), "draft": repr(fn), "matmul": self.matmul,
                   "kernel": kernels.build_id() if self.matmul == "kernel" else None,
                   "weights": f"{self.config.weights}/{self.config.dtype}",
                   "devices": self.mesh.size}  # fmt: skip
            params = self.draft_params_for(local, beam)
            self._costs[local] = tree_costs.step_costs(
                self.llm_params,
                self.llm_config,
                fns,
                params,
                self.llm_config.hidden_size,
                local,
                sizes,
                nodes,
                key,
            )
        return self._costs[local]

    def draft_params_for(self, rows: int, beam: BeamConfig):
        """The drafter's params and target tables for a batch of `rows` prompts drafting `beam`:
        the head rows as [K, D] when the drafting step's head product has one row (one prompt,
        one beam), transposed otherwise (`drafter.with_draft_head`). Same drafts either way."""
        return self.draft_params if rows * beam.draft_rows == 1 else self._draft_params_rows

    def draft_fns(self, beam: BeamConfig):
        """(the drafter's own drafts, `EngineConfig.draft_method` over `beam`; the draft function
        decoding uses: those with the lookup candidate if configured)."""
        if self.config.draft_method == "sample":
            beam_fn = spec.SampledDraft(self.drafter_config, beam, self.config.sampling)
        else:
            beam_fn = spec.BeamDraft(self.drafter_config, beam)
        if not self.config.lookup:
            return beam_fn, beam_fn
        return beam_fn, spec.LookupDraft(beam_fn, self.config.lookup, self.config.lookup_in_place)

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, item: PromptItem) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this Engine has no tokenizer; use generate_ids with token ids")
        return self.tokenizer.encode_chat(item.chat_messages)

    def _batch(self, prompts: list[list[int]]):
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError("a prompt has no tokens")
        width = int(-(-lengths.max() // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE)
        draft_len = self.beam_for(len(prompts)).length
        limit = self.llm_config.max_seq_len - self.config.max_new_tokens - draft_len
        if width > limit:
            raise ValueError(f"prompt of {lengths.max()} tokens exceeds the context ({limit})")
        toks = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p
        return jnp.asarray(toks), jnp.asarray(lengths)

    # -- generation ----------------------------------------------------------------------------

    def generate_ids(
        self, prompts: list[list[int]], row_ids: list[int], max_new: int | None = None
    ):
        """Token-id prompts -> (SpecOut as numpy, seconds of the fused decode).

        `max_new` lowers every row's token limit below `config.max_new_tokens` without a new
        compile (the limit is an array; the shapes keep `max_new_tokens`): 1 runs the prefill
        and the first token only, which `bench decode` subtracts to time the loop alone.
        """
        c = self.config
        limit = c.max_new_tokens if max_new is None else max_new
        if not 0 <= limit <= c.max_new_tokens:
            raise ValueError(f"max_new must be in 0..{c.max_new_tokens}, got {max_new}")
        toks, lengths = self._batch(prompts)
        b = len(prompts)
        beam = self.beam_for(b)
        args = (
            toks,
            lengths,
            jnp.full((b,), limit, jnp.int32),
            jax.random.key(c.seed),
            jnp.asarray(row_ids, jnp.int32),
        )
        if not c.speculate:
            return self._generate_plain(args)
        static = (
            self.llm_config,
            self.draft_fns(beam)[1],
            self.rule,
            c.sampling,
            c.max_new_tokens,
            beam.length,
            self.llm_config.eos_token_ids,
            self.costs_for(b),
        )
        compiled = self._generate.cache_size()
        t0 = time.perf_counter()
        draft_params = self.draft_params_for(b, beam)
        out = jax.device_get(self._generate(self.llm_params, draft_params, *args, *static))
        self.last_call_compiled = self._generate.cache_size() > compiled
        return out, time.perf_counter() - t0

    def _generate_plain(self, args):
        """`generate_ids` without a drafter: (SpecOut of plain autoregressive decoding, seconds);
        every token after the first is one target call, accepting nothing drafted."""
        c, cfg = self.config, self.llm_config
        static = (cfg, c.sampling, c.max_new_tokens, cfg.eos_token_ids)
        compiled = self._generate_ar.cache_size()
        t0 = time.perf_counter()
        out = jax.device_get(self._generate_ar(self.llm_params, *args, *static))
        self.last_call_compiled = self._generate_ar.cache_size() > compiled
        calls = np.maximum(np.asarray(out.lengths) - 1, 0)
        spec_out = spec.SpecOut(
            out.tokens, out.lengths, calls, calls[:, None], 0 * calls, calls[:, None]
        )
        return spec_out, time.perf_counter() - t0

    def phase_times(self, prompts: list[list[int]]) -> tuple[float, float]:
        """(draft ms, verify ms) of one step of this batch, each compiled and timed alone.

        The verify runs on per-layer weights (as the engine holds them) and a per-layer cache,
        split once before timing, as the decode loop splits it before its loop: a stacked model
        inside a lone jitted call copies every layer out first (in bf16 that made the timed
        verify 3-4x the loop's step).
        """
        c = self.config
        toks, lengths = self._batch(prompts)
        b = len(prompts)
        beam = self.beam_for(b)
        draft_fn = self.draft_fns(beam)[1]
        state = _start_jit(
            self.llm_params,
            toks,
            lengths,
            jnp.full((b,), c.max_new_tokens),
            jax.random.key(c.seed),
            jnp.arange(b),
            config=self.llm_config,
            sampling=c.sampling,
            num_tokens=c.max_new_tokens,
            length=beam.length,
            eos_ids=(),
        )
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, 1)
        draft_params = self.draft_params_for(b, beam)
        draft = lambda: _draft_jit(draft_fn, draft_params, state, keys)
        drafts = _timed(draft)[1]
        cache = unstack_cache(state.cache)  # the layers are held unstacked already
        slots = spec.draft_slots(draft_fn)
        verify = lambda: _verify_jit(self.llm_params, self.llm_config, cache, drafts.tokens, slots)
        return _timed(draft)[0], _timed(verify)[0]

    def _phase_times_once(self, prompts) -> tuple[float | None, float | None]:
        """phase_times, measured once per batch shape (a step's cost depends on little else)."""
        if not (self.config.time_phases and self.config.speculate):
            return None, None
        shape = (len(prompts), self._batch(prompts)[0].shape[1])
        if shape not in self._phase_ms:
            self._phase_ms[shape] = self.phase_times(prompts)
        return self._phase_ms[shape]

    def generate(self, items: list[PromptItem]) -> list[dict]:
        results = []
        for start in range(0, len(items), self.config.batch_size):
            results += self._generate_batch(items[start : start + self.config.batch_size])
        return results

    def _generate_batch(self, items: list[PromptItem]) -> list[dict]:
        prompts = [self.encode(item) for item in items]
        out, seconds = self.generate_ids(prompts, [row_id(item.id) for item in items])
        draft_ms, verify_ms = self._phase_times_once(prompts)
        beam = self.beam_for(len(prompts))
        tok_s = float(out.lengths.sum()) / seconds if seconds > 0 else None
        results = []
        for i, item in enumerate(items):
            ids = [int(t) for t in out.tokens[i, : out.lengths[i]]]
            metrics = row_metrics(out.calls[i], out.accepted[i], len(ids), out.drafted[i])
            speculate = self.config.speculate
            sizes = (0, *beam.verify_sizes) if speculate else (0,)
            metrics.update(
                speculative=speculate,
                width=beam.width if speculate else 0,
                length=beam.length if speculate else 0,
                per_root=beam.per_root,
                tree=beam.tree,
                cuts=list(beam.cuts),
                # Verify steps by the drafted tokens the policy verified (0: an AR step).
                steps_by_size={str(k): int(n) for k, n in zip(sizes, out.by_size[i], strict=True)},
                step_costs=self.costs_for(len(items)).as_dict() if speculate else None,
                draft_ms=draft_ms,
                verify_ms=verify_ms,
                tokens_per_s=tok_s,
                compiled=self.last_call_compiled,
            )
            results.append(
                {
                    "id": item.id,
                    "text": self.tokenizer.decode(ids),
                    "token_ids": ids,
                    "metrics": metrics,
                }
            )
        return results

    def draft(self, items: list[PromptItem]) -> list[dict]:
        """Prefill, take the target's first token and draft from it (no verification): per
        prompt the LLM's token and W drafts, each its drafted tokens (the LLM's token not
        included; a best-first tree's paths end where they end), their text and log-probability
        (`score`), and with `EngineConfig.draft_log_probs` each token's log-probability.

        Prompt `id` keys its randomness (`row_id`): its LLM token and draft w are drawn with keys
        folded from the seed, the id and w, whatever batch, padding, device or worker it is on."""
        c = self.config
        results = []
        for start in range(0, len(items), c.batch_size):
            chunk = items[start : start + c.batch_size]
            toks, lengths = self._batch([self.encode(item) for item in chunk])
            ids = jnp.asarray([row_id(item.id) for item in chunk], jnp.int32)
            beam = self.beam_for(len(chunk))
            static = (self.llm_config, self.draft_fns(beam)[0], c.sampling, beam.length)
            t0 = time.perf_counter()
            params = self.draft_params_for(len(chunk), beam)
            key = jax.random.key(c.seed)
            drafts = jax.device_get(self._draft(self.llm_params, params, toks, lengths, key, ids,
                                                *static))  # fmt: skip
            seconds = time.perf_counter() - t0
            for i, item in enumerate(chunk):
                results.append(self._draft_record(item, drafts, i, beam, seconds / len(chunk)))
        return results

    def _draft_record(self, item: PromptItem, drafts, i: int, beam: BeamConfig, seconds) -> dict:
        llm_token = int(drafts.tokens[i, 0, 0])
        out = []
        for row, score, token_lp in zip(drafts.tokens[i], drafts.scores[i],
                                        drafts.token_log_probs[i], strict=True):  # fmt: skip
            tokens = [int(t) for t in row[1:] if t != NO_TOKEN]
            draft = {"tokens": tokens, "text": self.tokenizer.decode(tokens), "score": float(score)}
            if self.config.draft_log_probs:
                draft["log_probs"] = [float(x) for x in token_lp[: len(tokens)]]
            out.append(draft)
        drafted = sum(len(d["tokens"]) for d in out)
        return {
            "id": item.id,
            "method": "tree" if beam.tree and self.config.draft_method == "beam" else
                      self.config.draft_method,
            "llm_token": llm_token,
            "llm_text": self.tokenizer.decode([llm_token]),
            "drafts": out,
            "metrics": {"width": beam.width, "length": beam.length, "drafts": len(out),
                        "drafted_tokens": drafted, "seconds": round(seconds, 6)},
        }  # fmt: skip

    def describe(self) -> dict:
        return {
            "devices": self.mesh.size,
            "matmul": self.matmul,
            "drafter": self.drafter_source,
            "config": dataclasses.asdict(self.config),
        }


def _ar_core(params, prompts, prompt_lengths, max_new, key, row_ids, config, sampling,
             num_tokens, eos_ids):  # fmt: skip
    """`pipeline.generate.generate_core` with positional statics (6..9), for `shard_jit`."""
    return generate_core(params, prompts, prompt_lengths, max_new, key, row_ids, config=config,
                         sampling=sampling, num_tokens=num_tokens, eos_ids=eos_ids)  # fmt: skip


def row_metrics(calls, accepted_hist, new_tokens: int, drafted=None) -> dict:
    """[] verify calls, [L+1] histogram of accepted draft lengths, [] drafted-token slots
    verified (None: not recorded) -> the per-row metrics."""
    calls = int(calls)
    hist = np.asarray(accepted_hist, np.float64)
    per_call = float((hist * np.arange(1, hist.size + 1)).sum() / calls) if calls else None
    at_least = hist[::-1].cumsum()[::-1][1:]  # steps that accepted >= d+1 drafted tokens
    return {
        "llm_calls": calls + 1,
        "steps": calls,
        "new_tokens": new_tokens,
        "accepted_per_call": per_call,
        "acceptance_per_depth": [float(x / calls) if calls else None for x in at_least],
        "drafted_per_call": float(drafted) / calls if calls and drafted is not None else None,
    }


PHASE_REPEATS = 5  # timed runs per phase; one run of a 5-40 ms step varied 2-3x on the CPU


def _timed(fn, repeats: int = PHASE_REPEATS):
    """Run once to compile, then time `repeats` runs: (median ms, result)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), out


_start_jit = jax.jit(
    spec.start, static_argnames=("config", "sampling", "num_tokens", "length", "eos_ids")
)
_draft_jit = jax.jit(spec.draft_step, static_argnums=0)
_verify_jit = jax.jit(spec.verify_step, static_argnums=(1, 4))
