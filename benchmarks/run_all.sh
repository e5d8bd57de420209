#!/usr/bin/env bash
# Run every benchmark and write its JSON into OUTDIR (default out/bench).
#   benchmarks/run_all.sh [OUTDIR]       (PY=python to use another interpreter)
# The figures in README.md come from this script.
set -euo pipefail
out=${1:-out/bench}
py=${PY:-.venv/bin/python}
mkdir -p "$out"
run() { echo "== specdraft bench $*" >&2; "$py" -m cluster bench "$@"; }
run drafter --out "$out/drafter.json"
run llm --batches 1 8 --out "$out/llm.json"
for dtype in float32 bfloat16; do
  run decode --batches 1 8 --beams 1x1 1x2 1x4 2x4 --repeats 2 --dtype "$dtype" \
    --out "$out/decode-$dtype.json"
  # The same comparison on 8 held-out prompts of the drafter's training style.
  run decode --prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --batches 1 8 \
    --beams 1x1 1x2 1x4 2x4 --repeats 2 --dtype "$dtype" --out "$out/decode-heldout-$dtype.json"
done
# Prompt lookup (fp32, held-out prompts): an added candidate and one in place of the last beam,
# against the drafter alone, at batch 1; in place at batch 8. Then the engine's tokens per call
# on all 64 held-out prompts.
held=(--prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --repeats 2)
run decode "${held[@]}" --batches 1 --beams 1x1 1x2 1x4 2x4 --lookup 0 4 \
  --out "$out/decode-heldout-lookup.json"
run decode "${held[@]}" --batches 1 --beams 1x1 1x2 1x4 2x4 --lookup 0 4i \
  --out "$out/decode-heldout-lookup-in-place.json"
run decode "${held[@]}" --batches 8 --beams 1x1 1x2 1x4 --lookup 0 4i \
  --out "$out/decode-heldout-lookup-in-place-batch8.json"
# One prompt (a greedy batch of one uses EngineConfig.single_beam): deeper trees with the lookup
# in place, at 48 and at 128 new tokens, and their tokens per call on all 64 held-out prompts.
run decode "${held[@]}" --batches 1 --beams 1x4 1x5 1x6 --lookup 4i \
  --out "$out/decode-heldout-batch1-deep.json"
run decode "${held[@]}" --batches 1 --beams 1x1 1x4 2x4 2x6 --lookup 4i --max-new-tokens 128 \
  --out "$out/decode-heldout-batch1-128.json"
run decode "${held[@]}" --batches 1 --beams 1x2 1x3 1x4 2x3 --lookup 4i --max-new-tokens 128 \
  --out "$out/decode-heldout-batch1-128-mid.json"
# Per-root beams (BeamConfig.per_root, an option; (1, 4) was then the default for a prompt alone), and
# the two candidates for that default head to head over 4 rounds.
run decode --prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --repeats 3 --batches 1 \
  --beams 1x4 2x4r 3x4r --lookup 4i --max-new-tokens 128 \
  --out "$out/decode-heldout-batch1-per-root.json"
run decode --prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --repeats 4 --batches 1 \
  --beams 1x4 2x4r --lookup 4i --max-new-tokens 128 \
  --out "$out/decode-heldout-batch1-head-to-head.json"
# Best-first trees (BeamConfig.tree; 4x8t is the default for a greedy prompt alone): batch 1 in
# four runs, then batch 8 against the (1, 1) default there.
tree=(--prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --repeats 4 --batches 1
      --lookup 4i --max-new-tokens 128)
run decode "${tree[@]}" --beams 1x4 4x4t 4x5t --out "$out/decode-heldout-batch1-tree.json"
run decode "${tree[@]}" --beams 4x5t 4x6t 4x8t --out "$out/decode-heldout-batch1-tree-deep.json"
run decode "${tree[@]}" --beams 4x8t 4x10t 4x12t 4x16t \
  --out "$out/decode-heldout-batch1-tree-deeper.json"
run decode "${tree[@]}" --beams 1x4 4x5t 4x8t --out "$out/decode-heldout-batch1-tree-head-to-head.json"
# Cut trees (BeamConfig.cuts, step costs measured on the machine; 4x8t/1/2/4 is the default for
# a greedy prompt alone) against the uncut tree.
run decode "${tree[@]}" --repeats 3 --beams 4x8t 4x8t/1/2/4 4x4t/1/2 \
  --out "$out/decode-heldout-batch1-cuts.json"
run decode --prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --repeats 3 --batches 8 \
  --beams 1x1 4x2t 4x3t --lookup 4i --max-new-tokens 128 --out "$out/decode-heldout-tree-batch8.json"
# The table: batch 1 and 8 in one run, chains and trees, the defaults among them.
run decode --prompts pipeline/data/heldout_prompts.jsonl --num-prompts 8 --repeats 2 --batches 1 8 \
  --beams 1x1 1x2 4x2t 4x3t 4x8t/1/2/4 --lookup 4i --max-new-tokens 128 \
  --out "$out/decode-heldout-batch1-batch8.json"
# The engine's default (one tree, goodput-adaptive sizes, AR steps a choice) against plain
# decoding, on two held-out sets that share no template or topic with the drafter's training:
# short open questions, and mixed tasks (given text to summarise or rewrite, code, arithmetic,
# extraction, multi-turn). Greedy at batch 1 4 8 16 and 1 8, sampled at 0.8.
policy=(--num-prompts 16 --beams default --max-new-tokens 96 --repeats 2)
run decode --prompts benchmarks/prompts/heldout-short.jsonl "${policy[@]}" --batches 1 4 8 16 \
  --out "$out/decode-policy-heldout-short.json"
run decode --prompts benchmarks/prompts/heldout-mixed.jsonl "${policy[@]}" --batches 1 8 \
  --out "$out/decode-policy-heldout-mixed.json"
run decode --prompts benchmarks/prompts/heldout-short.jsonl "${policy[@]}" --num-prompts 8 \
  --batches 1 8 --temperature 0.8 --out "$out/decode-policy-heldout-short-t08.json"
# The GGUF's own blocks against its fp32 dequantization, side by side, and llama.cpp on the same
# file (`bench llama-cpp` builds it once outside the repository, minutes; SKIP_LLAMA_CPP=1 skips).
run decode --prompts benchmarks/prompts/heldout-short.jsonl "${policy[@]}" --batches 1 8 \
  --weights fp32 native --out "$out/decode-weights-heldout-short.json"
run decode --prompts benchmarks/prompts/heldout-mixed.jsonl "${policy[@]}" --batches 1 8 \
  --weights fp32 native --out "$out/decode-weights-heldout-mixed.json"
run llm --weights fp32 native --out "$out/llm-weights.json"
if [ -z "${SKIP_LLAMA_CPP:-}" ]; then run llama-cpp --out "$out/llama-cpp.json"; fi
run accept --beams 1x1 1x2 1x4 2x4 --lookup 0 4 4i --out "$out/accept-heldout.json"
run accept --beams 1x4 1x6 1x8 2x4 2x6 --lookup 4i --out "$out/accept-heldout-deep.json"
run accept --beams 1x4 2x4 2x4r 3x4r --lookup 4i --out "$out/accept-heldout-per-root.json"
run accept --beams 1x4 --lookup 4i 6i 8i 2i --out "$out/accept-heldout-ngram.json"
run accept --beams 1x4 4x4t 4x5t 4x6t --lookup 4i --out "$out/accept-heldout-tree.json"
run accept --beams 4x8t 4x12t 8x8t --lookup 4i --out "$out/accept-heldout-tree-deep.json"
if [ -z "${SKIP_CLUSTER:-}" ]; then run cluster --tiny-engine --out "$out/cluster.json"; fi
if [ -z "${SKIP_CLUSTER:-}" ]; then run draft --repeats 2 --out "$out/draft.json"; fi
# Beam drafts against independent samples when decoding samples (tokens per call).
run accept --temperature 0.8 --draft-methods beam sample --beams 1x4 4x4 --lookup 0 \
  --num-prompts 32 --max-new-tokens 64 --out "$out/accept-t08-draft-methods.json"
