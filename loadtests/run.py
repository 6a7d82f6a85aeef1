"""`qaserve loadtest`: start the server (or use --url on loopback), ingest the workload's reviews,
run a Locust profile headless, check the constraints, print and plot the figures.

Exit status: 0 when every constraint held, 1 when any broke (each is named), 2 on bad usage.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from qaserve.loadtests.constraints import (
    Constraints,
    RouteStats,
    Violation,
    check,
    read_locust_stats,
    summary_table,
)
from qaserve.loadtests.profiles import PROFILES_FILE, Profile, load_profile
from qaserve.loadtests.profiling import where_cpu_went
from qaserve.loadtests.report import (
    load_samples,
    plot_latency_over_time,
    save_steps,
    step_stats,
    steps_table,
)
from qaserve.loadtests.workload import SAMPLE_DATA, from_subjqa
from qaserve.runtime.server import free_port
from qaserve_client.schema import DocumentIn

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def check_loopback(url: str) -> str:
    """Load tests only ever target this machine: refuse any other host."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load tests target loopback only (127.0.0.1, ::1, localhost): {url}")
    return url.rstrip("/")


class ServerProcess:
    """A server started for the run on a free loopback port, stopped with SIGTERM (then
    SIGKILL of its process group) however the run ends."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    @classmethod
    def start(
        cls,
        cmd: list[str],
        port: int,
        log: Path,
        timeout_s: float = 600,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        """Started (with `env`, default this process's) and ready (GET /readyz is 200), or
        stopped again and the error raised."""
        server = cls(cmd, port, log, env)
        try:
            server.wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text()[-2000:]
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server was not ready in {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def src_env(src: str | Path | None, base: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment for a server run from the source tree `src` (a folder holding the
    `qaserve` package, e.g. another commit's tree laid out as installed): `src` first on
    PYTHONPATH, ahead of the venv's own (editable) install, which Python's path finder
    consults only after PYTHONPATH. Ray's workers inherit it. None (inherit) without `src`."""
    if src is None:
        return None
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(Path(src).resolve()) + (os.pathsep + rest if rest else "")
    return env


def start_graph(
    config: str, out: Path, startup_timeout_s: float = 600, src: str | Path | None = None
) -> ServerProcess:
    """`qaserve serve` with its own store under `out` (no sample corpus); with `src`, the
    `qaserve` of that source tree serves (see `src_env`)."""
    port = free_port()
    cmd = [sys.executable, "-m", "qaserve.cli", "serve", "--config", config]
    cmd += ["--port", str(port), "--data-dir", str(out / "data"), "--no-sample"]
    return ServerProcess.start(cmd, port, out / "server.log", startup_timeout_s, src_env(src))


def ingest(url: str, docs: list[DocumentIn], api_key: str | None, batch: int = 16) -> float:
    from qaserve_client.client import Client

    t0 = time.perf_counter()
    with Client(url, api_key=api_key, timeout=600) as client:
        for i in range(0, len(docs), batch):
            client.ingest(docs[i : i + batch])
            print(f"\ringested {min(i + batch, len(docs))}/{len(docs)} reviews", end="", flush=True)
    print()
    return time.perf_counter() - t0


@dataclass
class RunResult:
    stats: dict[str, RouteStats]
    samples: list[dict[str, Any]]
    out: Path


def run_locust(
    url: str, profile: Profile, workload: Path, out: Path, api_key: str | None = None
) -> RunResult:
    """Locust headless in a subprocess (gevent stays out of this process); writes its HTML
    report and CSVs under `out`, and our per-request samples beside them."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "QASERVE_LOADTEST_WORKLOAD": str(workload),
        "QASERVE_LOADTEST_PROFILE": profile.model_dump_json(),
        "QASERVE_LOADTEST_SAMPLES": str(out / "samples.jsonl"),
    }
    if api_key:
        env["QASERVE_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    cmd += ["--host", url, "--csv", str(out / "locust"), "--html", str(out / "report.html")]
    cmd += ["--only-summary", "--loglevel", "WARNING", "--stop-timeout", "30"]
    with open(out / "locust.log", "wb") as log:
        proc = subprocess.run(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=profile.seconds + 180
        )
    stats_csv = out / "locust_stats.csv"
    if not stats_csv.exists():
        raise RuntimeError(
            f"Locust wrote no statistics (exit {proc.returncode}); see {out / 'locust.log'}:\n"
            + (out / "locust.log").read_text()[-2000:]
        )
    return RunResult(read_locust_stats(stats_csv), load_samples(out / "samples.jsonl"), out)


def prepare_workload(
    data: str | Path, split: str, max_questions: int | None, out: Path
) -> tuple[Path, list[DocumentIn]]:
    workload, docs = from_subjqa(data, split, max_questions)
    out.mkdir(parents=True, exist_ok=True)
    print(f"workload: {len(workload.questions)} questions, {len(docs)} reviews from {data}")
    return workload.save(out / "workload.json"), docs


def report_run(
    result: RunResult, profile: Profile, constraints: Constraints | None, title: str
) -> list[Violation]:
    """Print the summary and per-step tables, write them and the latency plot under out."""
    violations = check(constraints, result.stats, result.samples) if constraints else []
    table = summary_table(result.stats, constraints or Constraints(), violations, result.samples)
    steps = step_stats(result.samples, profile)
    save_steps(steps, result.out / "steps.json")
    text = f"## {title}\n\n{table}\n\nPer step (all requests):\n\n{steps_table(steps)}\n"
    (result.out / "summary.md").write_text(text)
    plot = plot_latency_over_time(result.samples, result.out / "latency.png", title)
    print(text)
    print(f"Locust report: {result.out / 'report.html'}; CSVs: {result.out}/locust_*.csv")
    if plot:
        print(f"latency plot: {plot}")
    return violations


def cmd_loadtest(args: Any) -> int:
    try:
        profile = load_profile(args.profile, args.profiles)
        constraints = None if args.no_check else Constraints.load(args.constraints)
        url = check_loopback(args.url) if args.url else None
    except (ValueError, OSError) as exc:
        print(f"qaserve loadtest: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/loadtest/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    workload, docs = prepare_workload(args.data, args.split, args.max_questions, out)
    print(f"profile {args.profile}: {profile.seconds:.0f} s, up to {profile.steps[-1].users} users")
    server = None
    try:
        if url is None:
            t0 = time.perf_counter()
            print(f"starting qaserve serve --config {args.config} (log: {out / 'server.log'})")
            server = start_graph(args.config, out, args.startup_timeout)
            url = server.url
            print(f"server ready on {url} in {time.perf_counter() - t0:.1f} s")
        if not args.no_ingest:
            print(f"ingest took {ingest(url, docs, args.api_key):.1f} s")
        with where_cpu_went(out, profile.seconds, args.py_spy or []) as cpu:
            result = run_locust(url, profile, workload, out / "locust", args.api_key)
    finally:
        if server is not None:
            rc = server.stop()
            print(f"server stopped (exit {rc})")
    title = f"qaserve loadtest --profile {args.profile}"
    violations = report_run(result, profile, constraints, title)
    print("\n\n".join(cpu))
    (out / "result.json").write_text(
        json.dumps({"violations": [str(v) for v in violations], "url": url}, indent=1)
    )
    if violations:
        print(f"\nFAILED: {len(violations)} constraint(s) broken:", file=sys.stderr)
        for v in violations:
            print(f"  - {v}", file=sys.stderr)
        return 1
    if constraints is not None:
        print(f"\nPASSED: every constraint in {args.constraints or 'constraints.yaml'} held")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest", help="run a Locust profile against the server and check latency constraints"
    )
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    p.add_argument("--config", default="local.yaml", help="graph YAML for the started server")
    p.add_argument("--data", default=str(SAMPLE_DATA), help="SubjQA CSV or domain folder")
    p.add_argument("--split", default="test", help="split when --data is a domain folder")
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--profile", default="check", help=f"a profile in {PROFILES_FILE.name}")
    p.add_argument("--profiles", default=None, help="profiles YAML (default: the shipped one)")
    p.add_argument("--constraints", default=None, help="constraints YAML (default: shipped)")
    p.add_argument("--no-check", action="store_true", help="report figures, check nothing")
    p.add_argument("--no-ingest", action="store_true", help="the server already has the reviews")
    p.add_argument("--out", default=None, help="output folder (default: runs/loadtest/<time>)")
    p.add_argument("--api-key", default=os.environ.get("QASERVE_API_KEY"))
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--py-spy",
        action="append",
        metavar="STAGE",
        help="record py-spy stacks of this stage's replicas during the run (repeatable)",
    )
    p.set_defaults(func=cmd_loadtest)
    from qaserve.loadtests.compare import register as register_compare

    register_compare(sub)
