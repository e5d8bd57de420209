"""Markdown tables from `bench decode` JSON files, for the README and `docs/`.

    python -m benchmarks.tables policy out/bench/decode-policy-*.json

`policy`: one row per (prompt set, temperature, batch) of the engine's default (`--beams
default`) against autoregressive decoding in the same run, with the sizes the policy verified.
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


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "policy":
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(policy_rows(argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
