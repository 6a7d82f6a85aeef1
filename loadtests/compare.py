"""`qaserve loadtest-compare`: the same Locust profile against the plain baseline and the graph
(one replica per stage, and autoscaling), alternating, with the ratios a user decides by.

Each system is started fresh for its turn (same machine, same CPU budget: Ray's CPU grants
add up to 2, the baseline runs torch on 2 threads), its store filled with the same reviews,
loaded, and stopped; the order alternates between rounds so drift in the shared machine's
background load hits every system alike.

A system is `baseline`, `graph-fixed`, `graph-autoscale`, `NAME=GRAPH_YAML` (any graph
config), or `NAME=GRAPH_YAML@SRC_DIR`: that graph served by the `qaserve` of another source
tree (SRC_DIR first on PYTHONPATH for the server and its Ray workers), so an older commit's
graph runs side by side with this one. The ratios are taken against `--baseline`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qaserve.loadtests.profiles import load_profile
from qaserve.loadtests.profiling import where_cpu_went
from qaserve.loadtests.report import (
    StepStats,
    plot_throughput_vs_users,
    save_steps,
    step_stats,
    steps_table,
)
from qaserve.loadtests.run import (
    ServerProcess,
    ingest,
    prepare_workload,
    report_run,
    run_locust,
    start_graph,
)
from qaserve.loadtests.workload import SAMPLE_DATA
from qaserve.runtime.server import free_port

CONFIGS = Path(__file__).resolve().parent / "configs"
SYSTEMS = ("baseline", "graph-fixed", "graph-autoscale")


@dataclass(frozen=True)
class System:
    """One system of a comparison: a built-in name, or a graph config (`config`) served by
    this install or by the source tree `src`."""

    name: str
    config: str | None = None
    src: Path | None = None


def parse_system(spec: str) -> System:
    """`baseline` | `graph-fixed` | `graph-autoscale` | `NAME=GRAPH_YAML[@SRC_DIR]`.

    GRAPH_YAML is a file (made absolute), else the name of a config packaged with the tree
    that serves it (`local.yaml@SRC_DIR` is SRC_DIR's own local.yaml). SRC_DIR must hold a
    `qaserve` package. ValueError on anything else."""
    spec = spec.strip()
    if "=" not in spec:
        if spec not in SYSTEMS:
            raise ValueError(
                f"unknown system {spec!r}: one of {', '.join(SYSTEMS)}, "
                "NAME=GRAPH_YAML or NAME=GRAPH_YAML@SRC_DIR"
            )
        return System(spec)
    name, _, rest = spec.partition("=")
    config, at, src_text = rest.rpartition("@") if "@" in rest else (rest, "", "")
    name, config, src_text = name.strip(), config.strip(), src_text.strip()
    if not name or not config or (at and not src_text):
        raise ValueError(f"bad system {spec!r}: NAME=GRAPH_YAML or NAME=GRAPH_YAML@SRC_DIR")
    if "/" in name or name in {".", ".."}:
        raise ValueError(f"bad system name {name!r} (it names the run's folders)")
    src = None
    if src_text:
        src = Path(src_text).expanduser().resolve()
        if not (src / "qaserve").is_dir():
            raise ValueError(f"{spec!r}: {src} holds no qaserve package")
    if Path(config).expanduser().is_file():
        config = str(Path(config).expanduser().resolve())
    return System(name, config, src)


def parse_systems(text: str) -> list[System]:
    """The comma-separated --systems, each name once."""
    systems = [parse_system(s) for s in text.split(",") if s.strip()]
    names = [s.name for s in systems]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"systems named more than once: {dupes}")
    if not systems:
        raise ValueError("no systems")
    return systems


def start_system(system: System, out: Path, reader_checkpoint: str | None) -> ServerProcess:
    """Start `system` (see parse_system) for one turn; its store and log under `out`."""
    if system.config is not None:
        return start_graph(system.config, out, src=system.src)
    name = system.name
    if name == "baseline":
        if not reader_checkpoint:
            raise ValueError("the baseline needs --reader-checkpoint (a torch reader checkpoint)")
        port = free_port()
        cmd = [sys.executable, "-m", "qaserve.loadtests.baseline", "--reader", reader_checkpoint]
        cmd += ["--port", str(port), "--threads", "2"]
        return ServerProcess.start(cmd, port, out / "server.log")
    config = str(CONFIGS / "graph-fixed.yaml") if name == "graph-fixed" else "local.yaml"
    return start_graph(config, out)


def merge_rounds(rounds: list[list[StepStats]]) -> list[StepStats]:
    """Per step, the median over rounds of each figure."""
    merged = []
    for steps in zip(*rounds, strict=True):
        first = steps[0]

        def med(attr: str, steps: tuple[StepStats, ...] = steps) -> float:
            return statistics.median(getattr(s, attr) for s in steps)

        statuses: dict[str, int] = {}
        for s in steps:
            for k, v in s.statuses.items():
                statuses[k] = statuses.get(k, 0) + v
        merged.append(
            StepStats(
                step=first.step,
                users=first.users,
                seconds=first.seconds,
                requests=int(med("requests")),
                errors=int(med("errors")),
                rps=med("rps"),
                p50_ms=med("p50_ms"),
                p95_ms=med("p95_ms"),
                p99_ms=med("p99_ms"),
                statuses=statuses,
            )
        )
    return merged


def throughput_within(rows: list[StepStats], p95_ms: float, max_errors: float = 0.01) -> float:
    """The best successful req/s of any step whose p95 and error ratio stay within budget."""
    ok = [r.rps for r in rows if r.p95_ms <= p95_ms and r.error_ratio <= max_errors]
    return max(ok, default=0.0)


def ratios(
    systems: dict[str, list[StepStats]], p95_budget_ms: float, baseline: str = "baseline"
) -> str:
    base = systems.get(baseline)
    lines = [
        f"| system | req/s within p95 <= {p95_budget_ms:g} ms | peak req/s | "
        + " | ".join(f"p95 ms @{r.users}u" for r in next(iter(systems.values())))
        + " | errors @ top step |",
        "|---" * (4 + len(next(iter(systems.values())))) + "|",
    ]
    for name, rows in systems.items():
        thr = throughput_within(rows, p95_budget_ms)
        peak = max(r.rps for r in rows)
        cells = [f"{thr:.2f}", f"{peak:.2f}"]
        if base is not None and name != baseline:
            bthr = throughput_within(base, p95_budget_ms)
            bpeak = max(r.rps for r in base)
            cells[0] += f" ({thr / bthr:.2f}x)" if bthr else f" ({baseline}: none within)"
            cells[1] += f" ({peak / bpeak:.2f}x)" if bpeak else ""
        for i, r in enumerate(rows):
            cell = f"{r.p95_ms:.0f}"
            if base is not None and name != baseline and r.p95_ms > 0:
                cell += f" ({base[i].p95_ms / r.p95_ms:.2f}x)"
            cells.append(cell)
        top = rows[-1]
        cells.append(f"{top.error_ratio:.1%} ({top.errors}/{top.requests})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_step_ratios(systems: dict[str, list[StepStats]], baseline: str) -> str:
    """Per step, each system's successful req/s and p95 divided by the baseline's."""
    base = systems.get(baseline)
    others = [n for n in systems if n != baseline]
    if base is None or not others:
        return ""
    head = " | ".join(f"{n} req/s ÷ {baseline} | {n} p95 ÷ {baseline}" for n in others)
    lines = [f"| users | {head} |", "|---" * (1 + 2 * len(others)) + "|"]

    def div(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    for i, b in enumerate(base):
        cells = [str(b.users)]
        for n in others:
            r = systems[n][i]
            cells += [div(r.rps, b.rps), div(r.p95_ms, b.p95_ms)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(
    merged: dict[str, list[StepStats]],
    title: str,
    budget_ms: float,
    out: Path,
    baseline: str = "baseline",
) -> str:
    """compare.md (tables and ratios) and throughput.png from the merged per-step figures."""
    text = [f"# {title}\n"]
    for name, rows in merged.items():
        text.append(f"## {name}\n\n{steps_table(rows)}\n")
    text.append(
        f"## Ratios (against {baseline}; p95 columns: {baseline} p95 / system p95)\n\n"
        + ratios(merged, budget_ms, baseline)
        + "\n"
    )
    steps = per_step_ratios(merged, baseline)
    if steps:
        text.append(
            f"## Per step against {baseline} (system / {baseline}: req/s above 1 and p95 "
            f"below 1 are better)\n\n{steps}\n"
        )
    report = "\n".join(text)
    (out / "compare.md").write_text(report)
    plot_throughput_vs_users(merged, out / "throughput.png", title)
    return report


def cmd_compare(args: Any) -> int:
    if args.report_only:
        out = Path(args.report_only)
        data = json.loads((out / "compare.json").read_text())
        merged = {k: [StepStats(**r) for r in rows] for k, rows in data["systems"].items()}
        baseline = args.baseline or data.get("baseline", "baseline")
        print(render(merged, data["title"], args.p95_budget_ms, out, baseline))
        return 0
    profile = load_profile(args.profile, args.profiles)
    try:
        systems = parse_systems(args.systems)
    except ValueError as exc:
        print(f"qaserve loadtest-compare: {exc}", file=sys.stderr)
        return 2
    baseline = args.baseline or "baseline"
    if baseline not in {s.name for s in systems} and args.baseline is not None:
        print(
            f"qaserve loadtest-compare: --baseline {baseline} is not among the systems",
            file=sys.stderr,
        )
        return 2
    if any(s.name == "baseline" and s.config is None for s in systems) and not (
        args.reader_checkpoint
    ):
        print(
            "qaserve loadtest-compare: --reader-checkpoint is required for the baseline "
            "(the torch checkpoint `qaserve train-reader` wrote, or a hub id)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or f"runs/compare/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    workload, docs = prepare_workload(args.data, args.split, args.max_questions, out)
    for s in systems:
        where = f", served from {s.src}" if s.src else ""
        print(f"system {s.name}: {s.config or 'built-in'}{where}")
    per_system: dict[str, list[list[StepStats]]] = {s.name: [] for s in systems}
    for rnd in range(args.rounds):
        order = systems if rnd % 2 == 0 else systems[::-1]
        for system in order:
            name = system.name
            run_out = out / f"{name}-round{rnd + 1}"
            run_out.mkdir(parents=True, exist_ok=True)
            print(f"\n=== round {rnd + 1}/{args.rounds}: {name} ===", flush=True)
            t0 = time.perf_counter()
            with start_system(system, run_out, args.reader_checkpoint) as server:
                print(f"{name} ready in {time.perf_counter() - t0:.1f} s", flush=True)
                ingest(server.url, docs, None)
                with where_cpu_went(run_out, profile.seconds, []) as cpu:
                    result = run_locust(server.url, profile, workload, run_out / "locust")
            report_run(result, profile, None, f"{name}, round {rnd + 1}")
            print("\n\n".join(cpu))
            steps = step_stats(result.samples, profile)
            save_steps(steps, run_out / "steps.json")
            per_system[name].append(steps)
    merged = {name: merge_rounds(runs) for name, runs in per_system.items() if runs}
    title = f"qaserve loadtest-compare --profile {args.profile}, median of {args.rounds} rounds"
    specs = {s.name: {"config": s.config, "src": str(s.src) if s.src else None} for s in systems}
    (out / "compare.json").write_text(
        json.dumps(
            {
                "title": title,
                "baseline": baseline,
                "specs": specs,
                "systems": {k: [vars(r) for r in v] for k, v in merged.items()},
            },
            indent=1,
        )
    )
    print("\n" + render(merged, title, args.p95_budget_ms, out, baseline))
    print(f"written: {out / 'compare.md'}, {out / 'throughput.png'}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest-compare",
        help="the same Locust profile against the plain baseline and the graph, with ratios",
    )
    p.add_argument("--reader-checkpoint", default=None, help="torch reader for the baseline")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated: any of {','.join(SYSTEMS)}, NAME=GRAPH_YAML, or "
        "NAME=GRAPH_YAML@SRC_DIR (served by the qaserve package under SRC_DIR, e.g. an older "
        "commit's tree; GRAPH_YAML a file, else a config packaged with that tree)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="the system the ratios are taken against (default: baseline)",
    )
    p.add_argument("--profile", default="steps")
    p.add_argument("--profiles", default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--p95-budget-ms", type=float, default=2000.0)
    p.add_argument("--data", default=str(SAMPLE_DATA))
    p.add_argument("--split", default="test")
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--out", default=None, help="output folder (default: runs/compare/<time>)")
    p.add_argument(
        "--report-only", metavar="DIR", help="re-render DIR/compare.json (e.g. another budget)"
    )
    p.set_defaults(func=cmd_compare)
