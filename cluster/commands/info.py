"""`specdraft info`: what this machine and setup would run on: JAX devices and the mesh, the
target model and drafter checkpoint, and (with --address) the Ray cluster's nodes.

Reads metadata only (GGUF header, config.json, drafter.json): no weights are loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="target .gguf or HF folder (default model)")
    parser.add_argument("--drafter", default=None, help="drafter folder (default: shipped)")
    parser.add_argument("--address", default=None,
                        help="also describe this Ray cluster ('auto', host:port)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    report = {
        "devices": _devices(),
        "model": _model(args.model),
        "drafter": _drafter(args.drafter),
        "ray": _ray(args.address or os.environ.get("RAY_ADDRESS")),
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for section, values in report.items():
            print(f"{section}:")
            for key, value in values.items():
                print(f"  {key}: {value}")
    return 0


def _devices() -> dict:
    import jax

    from sharding.mesh import make_mesh

    mesh = make_mesh()
    return {
        "backend": jax.default_backend(),
        "count": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "mesh": dict(mesh.shape),
    }


def _model(path: str | None) -> dict:
    from pipeline.models import ModelNotFoundError, default_model_path, require_model

    try:
        target = require_model(path) if path is None or Path(path).is_file() else Path(path)
    except ModelNotFoundError as err:
        return {"path": str(path or default_model_path()), "error": str(err)}
    try:
        config = _model_config(target)
    except (OSError, ValueError) as err:
        return {"path": str(target), "error": str(err)}
    return {"path": str(target), **dataclasses.asdict(config)}


def _model_config(target: Path):
    from pipeline.gguf_file import open_gguf
    from pipeline.weights import gguf_config, hf_config

    if target.is_dir():
        return hf_config(target)
    return gguf_config(open_gguf(target), target)


def _drafter(path: str | None) -> dict:
    from pipeline.drafter_io import DEFAULT_DRAFTER, read_info

    folder = Path(path) if path else DEFAULT_DRAFTER
    if not folder.is_dir():
        note = "not found" + ("" if path else ": generation uses an untrained drafter")
        return {"path": str(folder), "error": note}
    try:
        return {"path": str(folder), **read_info(folder)}
    except ValueError as err:
        return {"path": str(folder), "error": str(err)}


def _ray(address: str | None) -> dict:
    if not address:
        return {"connected": False, "hint": "pass --address auto to describe a running cluster"}
    import ray

    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as err:
        return {"connected": False, "error": f"cannot reach Ray at {address!r}: {err}. "
                "Start one with `ray start --head --dashboard-host 127.0.0.1`"}  # fmt: skip
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        return {
            "connected": True,
            "address": address,
            "nodes": len(nodes),
            "resources": ray.cluster_resources(),
            "per_node": {
                n["NodeManagerAddress"] + " " + n["NodeID"][:8]: n["Resources"] for n in nodes
            },  # fmt: skip
        }
    finally:
        ray.shutdown()
