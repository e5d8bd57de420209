"""`specdraft info`: what this machine and setup would run on: JAX devices and the mesh, the
target model and drafter checkpoint, and (with --address) the Ray cluster's nodes.

Reads metadata only (GGUF header, config.json, drafter.json): no weights are loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import sys
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
    warning = report["ray"].get("warning")
    if warning:
        print(warning, file=sys.stderr)
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
        context = ray.init(address=address, log_to_driver=False)
    except ConnectionError as err:
        return {"connected": False, "error": f"cannot reach Ray at {address!r}: {err}. "
                "Start one with `ray start --head --dashboard-host 127.0.0.1`"}  # fmt: skip
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        dashboard = context.dashboard_url or None
        report = {
            "connected": True,
            "address": address,
            "dashboard": dashboard,
            "nodes": len(nodes),
            "resources": ray.cluster_resources(),
            "per_node": {
                n["NodeManagerAddress"] + " " + n["NodeID"][:8]: n["Resources"] for n in nodes
            },  # fmt: skip
        }
        warning = exposure_warning(dashboard)
        if warning:
            report["warning"] = warning
        return report
    finally:
        ray.shutdown()


LOOPBACK = ("127.", "::1", "localhost", "0:0:0:0:0:0:0:1")


def exposure_warning(dashboard_url: str | None) -> str | None:
    """A warning when the dashboard (which serves the job API) is reachable beyond this
    machine: its address is not a loopback one, or, when it listens here, its port is bound to
    all interfaces or another address. Ray's job API runs any code it is sent, unauthenticated
    unless RAY_AUTH_MODE is on."""
    if not dashboard_url:
        return None
    hostport = dashboard_url.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    exposed = [] if host.startswith(LOOPBACK) else [host]
    if port.isdigit():
        exposed += [h for h in listening_hosts(int(port)) if not h.startswith(LOOPBACK)]
    if not exposed:
        return None
    where = ", ".join(sorted(set(exposed)))
    return (
        f"WARNING: the Ray dashboard and job API (port {port}) listen on {where}, beyond "
        "loopback: anyone who reaches it can run code on this cluster unless it requires Ray's "
        "token (RAY_AUTH_MODE=token; here RAY_AUTH_MODE="
        f"{os.environ.get('RAY_AUTH_MODE', 'unset')}). Restart the head with `ray start --head "
        "--dashboard-host 127.0.0.1`, or use token authentication (README, Ray)"
    )


def listening_hosts(port: int) -> list[str]:
    """Addresses that TCP sockets of this machine (its network namespace) listen on at `port`,
    from /proc/net/tcp and tcp6 (Linux; elsewhere none are known)."""
    hosts = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                hosts.append(_address(bytes.fromhex(address), width))
    return hosts


def _address(raw: bytes, width: int) -> str:
    """/proc/net/tcp's address: 32-bit words in host (little-endian) order."""
    words = [raw[i : i + 4] for i in range(0, width, 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    ip = ipaddress.ip_address(b"".join(words))
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return "::" if ip.is_unspecified and ip.version == 6 else str(ip)
