"""`specdraft draft`: the drafter's beams for every prompt (token ids, text, scores), without
verification by the target model. Same flags and placement as `generate`."""

from __future__ import annotations

import argparse

from cluster import job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    job.add_arguments(parser, "draft")


def run(args: argparse.Namespace) -> int:
    return job.run(args, "draft")
