"""`specdraft generate`: speculative decoding over a prompt file (see cluster/job.py for where
it runs: in this process, an embedded local Ray, or a running cluster)."""

from __future__ import annotations

import argparse

from cluster import job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    job.add_arguments(parser, "generate")


def run(args: argparse.Namespace) -> int:
    return job.run(args, "generate")
