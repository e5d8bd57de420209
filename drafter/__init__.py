"""The ReDrafter draft model and drafting: pure functions over a params pytree."""

from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import Drafts, beam_search, draft_batch, sample_drafts, sample_seq
from drafter.model import (
    TargetEmbeddings,
    check_target,
    draft_logits,
    init_params,
    logits_to_log_probs,
    rnn_drafter,
    rnn_step,
    to_target_ids,
    with_draft_head,
)
from drafter.reference import load_reference, save_reference
from drafter.sampling import SamplingConfig, greedy, sample, warp_log_probs

__all__ = [
    "BeamConfig",
    "DrafterConfig",
    "Drafts",
    "SamplingConfig",
    "TargetEmbeddings",
    "beam_search",
    "check_target",
    "draft_batch",
    "draft_logits",
    "greedy",
    "init_params",
    "load_reference",
    "logits_to_log_probs",
    "rnn_drafter",
    "rnn_step",
    "sample",
    "sample_drafts",
    "sample_seq",
    "save_reference",
    "to_target_ids",
    "warp_log_probs",
    "with_draft_head",
]
