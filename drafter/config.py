"""Frozen configuration of the ReDrafter draft model and of beam search.

Both are hashable, so jitted functions take them as static arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

# The reference keeps only its 50 largest logits (its `warp_logits` default) and writes this value
# into the others before the log-softmax.
REFERENCE_TOP_K = 50
REFERENCE_MASK_VALUE = -50000.0


def _positive(owner: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class DrafterConfig:
    """Shape and options of a ReDrafter draft head.

    hidden_size: D, the target LLM's hidden size; the RNN state H equals D, as in ReDrafter.
    vocab_size: V, the target LLM's vocabulary.
    exit_dim: E, width of the ResBlocks. An input projection (2D -> E) exists iff 2D != E.
    num_draft_layers: number of ResBlocks, `x + SiLU(x W + b)`.
    tie_lm_head: use the target LLM's output embedding as the LM head (logits = x @ lm_head.T).
        Requires exit_dim == hidden_size so that x lives in the target's hidden space; we chose
        this over an extra E -> D projection because the input projection already maps 2D -> D,
        so the tied drafter needs no new weight kind.
    draft_vocab_size: K, draft over only K target tokens (the K most frequent), mapped back to
        target ids by `TargetEmbeddings.vocab_map`; None drafts over all V tokens.
    reference_logits: reproduce the PyTorch reference exactly: subtract the max logit, set all but
        the top-50 logits to -50000, then log-softmax.
    """

    hidden_size: int
    vocab_size: int
    exit_dim: int
    num_draft_layers: int = 1
    tie_lm_head: bool = False
    draft_vocab_size: int | None = None
    reference_logits: bool = False

    def __post_init__(self):
        _positive("DrafterConfig", "hidden_size", self.hidden_size)
        _positive("DrafterConfig", "vocab_size", self.vocab_size)
        _positive("DrafterConfig", "exit_dim", self.exit_dim)
        _positive("DrafterConfig", "num_draft_layers", self.num_draft_layers, minimum=0)
        if self.tie_lm_head and self.exit_dim != self.hidden_size:
            raise ValueError(
                f"DrafterConfig.exit_dim must equal hidden_size ({self.hidden_size}) when "
                f"tie_lm_head is set, got {self.exit_dim}"
            )
        if self.draft_vocab_size is not None:
            _positive("DrafterConfig", "draft_vocab_size", self.draft_vocab_size)
            if self.draft_vocab_size > self.vocab_size:
                raise ValueError(
                    f"DrafterConfig.draft_vocab_size must be <= vocab_size ({self.vocab_size}), "
                    f"got {self.draft_vocab_size}"
                )

    @property
    def has_input_proj(self) -> bool:
        return 2 * self.hidden_size != self.exit_dim

    @property
    def draft_vocab(self) -> int:
        """The size of the distributions the drafter produces (K if reduced, else V)."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size


@dataclass(frozen=True)
class BeamConfig:
    """Beam search shape: `width` beams (W) of `length` drafted tokens (L) after the LLM's token.

    per_root: each of the first step's top-W tokens grows its own beam, one token at a time by
    that beam's argmax (W greedy chains from W distinct first tokens), instead of every later step
    keeping the joint top-W over all beams. Joint beams tend to share their first tokens and
    differ only deep down, where a draft is rarely still accepted; distinct first tokens raise the
    chance that some candidate's first token is right (held-out, README). Same cost per step.

    tree: a best-first tree of `length` drafted tokens instead of beams (`drafting.best_first`).
    Token by token it adds the most probable (by path log-probability) of the top-`width`
    children of the tokens chosen so far, so it branches where the drafter is unsure and runs
    deep where it is sure. Verified as a tree of 1 + L nodes, the size of the (1, L) chain, with
    the same L drafting steps of one row each; `1xLt` is the (1, L) chain itself. Its Drafts hold
    one candidate per drafted token (the path to it), so W there is L.

    cuts: smaller sizes (drafted tokens, each < L) a best-first tree may be drafted and verified
    at, chosen per step (`pipeline.policy`). The tree's first k tokens are a tree themselves (a
    parent is chosen before its children), and under greedy verification each token adds its
    chance of lying on the target's path, which the drafter's path probability estimates.
    `node_cost`: one more tree node's verify cost as a fraction of a one-token step, the linear
    model the policy uses where step costs are not measured (`EngineConfig.adaptive` off).
    Exact either way: what is drafted never changes what is generated.
    """

    width: int
    length: int
    per_root: bool = False
    tree: bool = False
    cuts: tuple[int, ...] = ()
    node_cost: float = 0.06

    def __post_init__(self):
        _positive("BeamConfig", "width", self.width)
        _positive("BeamConfig", "length", self.length)
        for flag in ("per_root", "tree"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"BeamConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.per_root and self.tree:
            raise ValueError(
                "BeamConfig: per_root and tree exclude each other (a tree has no beams)"
            )
        object.__setattr__(self, "cuts", tuple(sorted(set(self.cuts))))
        if self.cuts and not self.tree:
            raise ValueError(f"BeamConfig.cuts {self.cuts} need a best-first tree (tree=True)")
        for k in self.cuts:
            if not isinstance(k, int) or not 1 <= k < self.length:
                raise ValueError(
                    f"BeamConfig.cuts: each cut must be an int in 1..{self.length - 1} "
                    f"(below the tree's length), got {k!r}"
                )
        if not self.node_cost >= 0:
            raise ValueError(f"BeamConfig.node_cost must be >= 0, got {self.node_cost!r}")

    @property
    def tree_nodes(self) -> int:
        """Node slots of the verified tree: the root plus W*L beam tokens, or L tree tokens."""
        return 1 + (self.length if self.tree else self.width * self.length)

    @property
    def draft_rows(self) -> int:
        """Rows of one drafting step's head product (per prompt): W beams, or 1 for a tree."""
        return 1 if self.tree else self.width

    @property
    def verify_sizes(self) -> tuple[int, ...]:
        """Drafted tokens a step may verify: the cuts, then the whole tree (L)."""
        return (*self.cuts, self.length) if self.tree else (self.length,)

    def __str__(self) -> str:
        """The `parse` form: "2x3", "2x3r", "4x8t", "4x8t/4", "4x8t/4@0.1"."""
        text = f"{self.width}x{self.length}" + ("r" if self.per_root else "t" if self.tree else "")
        text += "".join(f"/{k}" for k in self.cuts)
        default = BeamConfig.__dataclass_fields__["node_cost"].default
        return text + (f"@{self.node_cost:g}" if self.cuts and self.node_cost != default else "")

    @classmethod
    def parse(cls, text: str) -> BeamConfig:
        """ "2x3" -> BeamConfig(width=2, length=3), "2x3r" -> the same per root, "4x4t" -> a
        best-first tree of 4 tokens from the top-4 children, "4x8t/4" -> that tree of 8 tokens,
        cut to 4 where its path probabilities say so (`cuts`), "4x8t/4@0.1" -> the same at a
        `node_cost` of 0.1; ValueError naming the text otherwise."""
        shape, _, cost_text = text.lower().partition("@")
        body, *cut_texts = shape.split("/")
        if "@" in text:
            try:
                node_cost = float(cost_text)
            except ValueError:
                raise ValueError(f"expected a node cost such as 4x8t/4@0.1, got {text!r}") from None
            if not cut_texts:
                raise ValueError(f"a node cost ('@C') needs cuts ('/K'), got {text!r}")
            cut = cls.parse(shape)
            return cls(cut.width, cut.length, tree=True, cuts=cut.cuts, node_cost=node_cost)
        try:
            cuts = tuple(int(c) for c in cut_texts)
        except ValueError:
            raise ValueError(
                f"expected cuts such as 4x8t/4 (integers after '/'), got {text!r}"
            ) from None
        if cuts:
            if not body.endswith("t"):
                raise ValueError(f"cuts ('/K') apply to best-first trees (WxLt), got {text!r}")
            tree = cls.parse(body)
            if any(not 1 <= k < tree.length for k in cuts):
                raise ValueError(f"each cut in {text!r} must be in 1..{tree.length - 1}")
            return cls(tree.width, tree.length, tree=True, cuts=cuts)
        per_root, tree = body.endswith("r"), body.endswith("t")
        try:
            width, length = (int(p) for p in (body[:-1] if per_root or tree else body).split("x"))
        except ValueError:
            raise ValueError(
                f"expected WxL such as 2x3 (2x3r: per root, 4x3t: a best-first tree), got {text!r}"
            ) from None
        if width < 1 or length < 1:
            raise ValueError(f"W and L must be >= 1, got {text!r}")
        return cls(width, length, per_root, tree)
