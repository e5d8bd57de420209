"""`--plot`: a PNG report of a finished job, from its result records and summary.

Three panels: acceptance per draft depth (the fraction of verify steps that accepted drafted
token d, averaged over prompts), the histogram of tokens per verify step per prompt (1 = nothing
accepted, L+1 = the whole draft plus the bonus token), and tokens/s per worker.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.outputs import OutputPathError


def plot_report(records: list[dict], summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed on a cluster node
    import matplotlib.pyplot as plt

    metrics = [r["metrics"] for r in records if r.get("metrics")]
    fig, (depth_ax, hist_ax, worker_ax) = plt.subplots(1, 3, figsize=(15, 4))
    _depths(depth_ax, metrics)
    _histogram(hist_ax, metrics)
    _workers(worker_ax, summary)
    fig.suptitle(f"{summary['answered']} prompts, {summary['errors']} errors, "
                 f"{summary['tokens_per_s'] or 0:.1f} tokens/s overall")  # fmt: skip
    fig.tight_layout()
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100)
    except OSError as err:
        raise OutputPathError(f"cannot write --plot {png}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def _depths(ax, metrics: list[dict]) -> None:
    rows = [m["acceptance_per_depth"] for m in metrics if m.get("acceptance_per_depth")]
    depth = max((len(r) for r in rows), default=0)
    means = []
    for d in range(depth):
        values = [r[d] for r in rows if d < len(r) and r[d] is not None]
        means.append(sum(values) / len(values) if values else 0.0)
    ax.bar(range(1, depth + 1), means, color="tab:blue")
    ax.set_xticks(range(1, depth + 1))
    ax.set(title="acceptance per draft depth", xlabel="drafted token", ylabel="accepted fraction",
           ylim=(0, 1))  # fmt: skip


def _histogram(ax, metrics: list[dict]) -> None:
    values = [m["accepted_per_call"] for m in metrics if m.get("accepted_per_call") is not None]
    if not values:  # engines without the metric (e.g. `draft` jobs): tokens per step instead
        values = [m["new_tokens"] / m["steps"] for m in metrics if m.get("steps")]
    ax.hist(values, bins=20, color="tab:green")
    ax.set(title="tokens per verify step (per prompt)", xlabel="tokens / step", ylabel="prompts")


def _workers(ax, summary: dict) -> None:
    workers = {n: w for n, w in summary["workers"].items() if w["tokens_per_s"] is not None}
    ax.bar(list(workers), [w["tokens_per_s"] for w in workers.values()], color="tab:orange")
    ax.set(title="tokens/s per worker (busy time)", ylabel="tokens / s")
