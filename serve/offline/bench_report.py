"""The reader benchmark's outputs: the table (`qaserve bench reader` prints it) and the book's
plot, both read from the report dict that serve/offline/bench.py builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """One line per variant: size, latency, accuracy, throughput, and the ratios against
    the baseline (torch fp32) and against the served int8; then what was kept out."""
    sizes = [str(s) for s in report["batch_sizes"]]
    served = report.get("served")
    width = max(14, *(len(n) for n in report["variants"]))
    head = (
        f"{'variant':<{width}} {'MB':>6} {'smaller':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'x base':>6} {'x int8':>6} {'EM':>5} {'F1':>5} {'lenF1':>5} {'dF1':>5} {'dF1i8':>5}"
        + "".join(f" {'q/s@' + s:>7}" for s in sizes)
    )
    lines = [head, "-" * len(head)]
    for name, row in report["variants"].items():
        r, v = row["ratios"], row.get("vs_served", {})
        lines.append(
            f"{name:<{width}} {row['size_mb']:>6.1f} {r['size_ratio']:>6.2f}x "
            f"{row['latency_ms']['median']:>7.2f} {row['latency_ms']['p95']:>7.1f} "
            f"{r['speedup_median']:>5.2f}x {_ratio(v.get('speedup_median')):>6} "
            f"{100 * row['em']:>5.1f} {100 * row['f1']:>5.1f} {100 * row['lenient_f1']:>5.1f} "
            f"{r['f1_delta_points']:>+5.1f} {_points(v.get('f1_delta_points')):>5}"
            + "".join(f" {row['throughput_qps'][s]:>7.1f}" for s in sizes)
        )
    lines.append(
        f"x base / smaller / dF1: against {report['baseline']}; x int8 / dF1i8: against the "
        f"served {served or '(not run)'}; EM/F1 SQuAD 2.0 official, lenF1 lenient, in %; "
        f"latency per question at batch 1 over {report['questions']} questions after "
        f"{report['warmup']} warm-up; {report['machine']['threads']} threads"
    )
    for name, info in report.get("readers", {}).items():
        zlib = (
            f"; weights {info['safetensors_mb']:.1f} MB, zlib {info['zlib_mb']:.1f} MB"
            if "zlib_mb" in info
            else ""
        )
        if "parameters" not in info:  # an exported folder, benched as served
            lines.append(f"{name}: {info['layers']} layers, {info.get('format')} as shipped")
            continue
        lines.append(
            f"{name}: {info['layers']} layers, {info['parameters'] / 1e6:.1f}M parameters, "
            f"sparsity {100 * info['sparsity']:.1f}% of the encoder linears{zlib}"
        )
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"{name}: not run: {reason}")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _points(x: float | None) -> str:
    return "" if x is None else f"{x:+.1f}"


def plot(report: dict[str, Any], path: Path) -> None:
    """The book's plot: F1 against median latency, bubble area = model size, each labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    rows = report["variants"]
    biggest = max(r["size_mb"] for r in rows.values())
    fig, ax = plt.subplots(figsize=(11, 6))
    for i, (name, r) in enumerate(rows.items()):
        x, y = r["latency_ms"]["median"], 100 * r["f1"]
        ax.scatter(
            x,
            y,
            s=2000 * r["size_mb"] / biggest,
            alpha=0.45,
            color=f"C{i % 10}",
            edgecolors="k",
            label=f"{i + 1}  {name} ({r['size_mb']:.1f} MB)",
        )
        # A number on the bubble, the name in the legend: variants often sit on each other
        # (fp32 and fp32-opt answer alike), where names would overprint.
        ax.annotate(str(i + 1), (x, y), ha="center", va="center", fontsize=9, weight="bold")
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, labelspacing=1)
    for handle in legend.legend_handles:
        if isinstance(handle, PathCollection):
            handle.set_sizes([50])  # the legend names a variant; its bubble says the size
    ys = [100 * r["f1"] for r in rows.values()]
    xs = [r["latency_ms"]["median"] for r in rows.values()]
    pad_y = max(2.0, (max(ys) - min(ys)) * 0.3)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    ax.set_xlim(0, max(xs) * 1.35)
    ax.set_xlabel("median latency per question, batch 1 (ms)")
    ax.set_ylabel("F1, SQuAD 2.0 official (%)")
    ax.grid(alpha=0.3)
    ax.set_title(
        f"reader benchmark: {report['data_name']} ({report['questions']} questions, "
        f"{report['machine']['threads']} threads); bubble area = model size",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
