"""Markdown tables from `bench decode` JSON files, for the README and `docs/`.

    python -m benchmarks.tables policy out/bench/decode-policy-*.json
    python -m benchmarks.tables weights out/bench/decode-weights-*.json [llama-cpp.json]

`policy`: one row per (prompt set, temperature, batch) of the engine's default (`--beams
default`) against autoregressive decoding in the same run, with the sizes the policy verified.
`weights`: one row per (prompt set, batch, weights) of `bench decode --weights fp32 native`,
AR and the default against the first kind's AR in the same run, and llama.cpp's tokens/s at
that batch from a `bench llama-cpp` JSON when one is given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _sizes(hist: dict) -> str:
    total = sum(hist.values()) or 1
    return " ".join(f"{k}:{100 * n / total:.0f}%" for k, n in hist.items() if n)


def policy_rows(paths: list[str]) -> list[str]:
    lines = [
        "| prompts | temperature | batch | spec tok/s | AR tok/s | speedup (per round) "
        "| tokens/call | same as AR | steps by size verified |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        data = json.loads(Path(path).read_text())
        name = Path(data.get("prompts_file") or "built-in").stem
        for r in data["results"]:
            if r.get("policy") != "adaptive":
                continue
            rounds = "/".join(f"{x:.2f}" for x in r["speedup_rounds"])
            lines.append(
                f"| {name} | {data.get('temperature', 0.0):g} | {r['batch']} "
                f"| {r['spec_tok_s']:.1f} | {r['ar_tok_s']:.1f} | **{r['speedup']:.2f}** "
                f"({rounds}) | {r['accepted_per_call']:.2f} "
                f"| {r['rows_identical_to_ar']}/{r['prompts']} | {_sizes(r['steps_by_size'])} |"
            )
    return lines


def weights_rows(paths: list[str]) -> list[str]:
    llama = {}
    decode = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("benchmark") == "llama-cpp":
            for r in data["results"]:
                # llama-bench's batch-1 figure; llama-batched-bench's for larger batches.
                if r["batch"] > 1 or r["tool"] == "llama-bench":
                    llama[r["batch"]] = r["tok_s"]
        else:
            decode.append(data)
    lines = [
        "| prompts | batch | weights | weight MB a step | AR tok/s | default tok/s "
        "| default / fp32 AR | same as AR | llama.cpp tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for data in decode:
        name = Path(data.get("prompts_file") or "built-in").stem
        for r in data["results"]:
            if r.get("policy") != "adaptive":
                continue
            other = f"{llama[r['batch']]:.1f}" if r["batch"] in llama else "-"
            mbytes = r["weight_bytes_per_step"] / 1e6
            lines.append(
                f"| {name} | {r['batch']} | {r['weights']} | {mbytes:.0f} "
                f"| {r['ar_tok_s']:.1f} | {r['spec_tok_s']:.1f} "
                f"| **{r['speedup_vs_baseline_ar']:.2f}** "
                f"| {r['rows_identical_to_ar']}/{r['prompts']} | {other} |"
            )
    return lines


TABLES = {"policy": policy_rows, "weights": weights_rows}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in TABLES:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(TABLES[argv[0]](argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
