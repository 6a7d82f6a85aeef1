"""Load tests: the constraint checker, the profiles' bounds, and real headless Locust runs on
tiny models against the qaserve app and against the plain baseline."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from qaserve.loadtests.constraints import Constraints, check, read_locust_stats, tokens_per_s
from qaserve.loadtests.profiles import Profile, load_profiles
from qaserve.loadtests.report import step_stats
from qaserve.loadtests.run import check_loopback

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"

HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def _stats_csv(tmp_path: Path, rows: list[tuple[str, str, int, int, float, float, float, float]]):
    """Locust's stats CSV: (type, name, count, failures, rps, p50, p95, p99) per row."""
    lines = [HEADER]
    for typ, name, n, f, rps, p50, p95, p99 in rows:
        cells = [typ, name, n, f, p50, p50, 1, p99, 10, rps, 0, p50, p50, p50, p50, p95, p95]
        cells += [p99, p99, p99, p99, p99]
        lines.append(",".join(str(c) for c in cells))
    path = tmp_path / "locust_stats.csv"
    path.write_text("\n".join(lines) + "\n")
    return read_locust_stats(path)


ROWS: list[tuple[str, str, int, int, float, float, float, float]] = [
    ("POST", "query:extractive", 100, 0, 5.0, 200, 600, 900),
    ("POST", "read", 50, 1, 2.5, 40, 120, 150),
    ("SSE", "generate:first-token", 10, 0, 0.5, 500, 900, 950),
    ("SSE", "generate:stream", 10, 0, 0.5, 1500, 2500, 2600),
    ("", "Aggregated", 170, 1, 8.5, 200, 1000, 2000),
]
STREAMS = [{"name": "stream", "tokens": 17, "decode_s": 2.0}] * 3  # 8 tokens/s


def _constraints(text: str) -> Constraints:
    return Constraints.model_validate(yaml.safe_load(textwrap.dedent(text)))


def test_constraints_pass(tmp_path: Path) -> None:
    stats = _stats_csv(tmp_path, ROWS)
    c = _constraints("""
        routes:
          query:extractive: {p50_ms: 250, p95_ms: 700, p99_ms: 1000, max_error_ratio: 0}
          read: {p95_ms: 200, max_error_ratio: 0.05, min_rps: 2}
          generate:first-token: {p95_ms: 1000}
        overall: {max_error_ratio: 0.01, min_rps: 8}
        stream: {min_tokens_per_s: 5}
    """)
    assert check(c, stats, STREAMS) == []
    assert tokens_per_s(STREAMS) == [8.0, 8.0, 8.0]


def test_constraints_fail_names_every_broken_limit(tmp_path: Path) -> None:
    stats = _stats_csv(tmp_path, ROWS)
    c = _constraints("""
        routes:
          query:extractive: {p50_ms: 150, p95_ms: 700, p99_ms: 800}
          read: {max_error_ratio: 0.0, min_rps: 3}
          generate:first-token: {p95_ms: 800}
        overall: {max_error_ratio: 0.001, min_rps: 20}
        stream: {min_tokens_per_s: 10}
    """)
    broken = {(v.route, v.metric) for v in check(c, stats, STREAMS)}
    assert broken == {
        ("query:extractive", "p50_ms"),
        ("query:extractive", "p99_ms"),
        ("read", "error_ratio"),
        ("read", "rps"),
        ("generate:first-token", "p95_ms"),
        ("overall", "error_ratio"),
        ("overall", "rps"),
        ("stream", "tokens_per_s"),
    }
    # Overall totals leave out derived events: 100 + 50 + 10 requests, 1 failure.
    v = next(v for v in check(c, stats, STREAMS) if v.route == "overall" and v.metric == "rps")
    assert v.measured == pytest.approx(8.0)


def test_constraints_missing_data_is_a_failure(tmp_path: Path) -> None:
    stats = _stats_csv(tmp_path, [*ROWS[:2], ("POST", "retrieve", 0, 0, 0, 0, 0, 0)])
    c = _constraints("""
        routes:
          retrieve: {p95_ms: 1000}
          query:generative: {p95_ms: 1000}
          read: {min_requests: 60}
        stream: {min_tokens_per_s: 1}
    """)
    violations = check(c, stats, [])
    assert {(v.route, v.metric, v.measured) for v in violations} == {
        ("retrieve", "requests", None),
        ("query:generative", "requests", None),
        ("read", "requests", 50),
        ("stream", "streams", None),
    }
    assert "no data" in str(violations[0])
    assert check(_constraints("overall: {min_rps: 0}"), {}, []) != []  # an empty run fails


def test_constraints_file_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _constraints("routes: {read: {p95: 100}}")  # p95_ms, not p95
    assert Constraints.load().routes  # the committed file loads


def test_profiles_are_bounded() -> None:
    profiles = load_profiles()
    assert {"check", "steps", "smoke"} <= set(profiles)
    base: dict[str, Any] = {"tasks": {"read": 1}}
    with pytest.raises(ValueError):
        Profile.model_validate({**base, "steps": [{"users": 65, "seconds": 1}]})
    with pytest.raises(ValueError):
        Profile.model_validate({**base, "steps": [{"users": 1, "seconds": 1000}] * 2})
    with pytest.raises(ValueError):
        Profile.model_validate({"tasks": {"drop_all": 1}, "steps": [{"users": 1, "seconds": 1}]})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:80"])
def test_loopback_accepted(url: str) -> None:
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "https://example.com", "http://0.0.0.0"])
def test_other_hosts_refused(url: str) -> None:
    with pytest.raises(ValueError, match="loopback only"):
        check_loopback(url)


def test_step_stats_cut_by_step() -> None:
    profile = Profile.model_validate(
        {"tasks": {"read": 1}, "steps": [{"users": 1, "seconds": 10}, {"users": 2, "seconds": 5}]}
    )
    samples = [{"name": "read", "ms": 100.0, "ok": True, "status": 200, "step": 0}] * 20
    samples += [{"name": "read", "ms": 300.0, "ok": True, "status": 200, "step": 1}] * 10
    samples += [{"name": "read", "ms": 5.0, "ok": False, "status": 503, "step": 1}] * 2
    samples += [{"name": "generate:first-token", "ms": 1.0, "ok": True, "step": 1}]
    rows = step_stats(samples, profile)
    assert [r.rps for r in rows] == [2.0, 2.0]
    assert (rows[1].requests, rows[1].errors, rows[1].p50_ms) == (12, 2, 300.0)
    assert rows[1].statuses == {"200": 10, "503": 2}


# --- real headless runs on tiny models --------------------------------------------------------

QUICK = {
    "profiles": {
        "quick": {
            "steps": [{"users": 2, "seconds": 8}],
            "spawn_rate": 2,
            "wait_s": [0, 0.05],
            "tasks": {"query_extractive": 3, "retrieve": 1, "read": 1, "generate_stream": 1},
            "writes_per_min": 60,
            "max_new_tokens": 4,
        }
    }
}
LIMITS = {
    "routes": {
        "query:extractive": {"p95_ms": 20000, "max_error_ratio": 0},
        "read": {"p95_ms": 20000, "max_error_ratio": 0},
        "generate:first-token": {"p95_ms": 20000},
        "documents:write": {"max_error_ratio": 0},
    },
    "overall": {"max_error_ratio": 0, "min_rps": 0.5},
    "stream": {"min_tokens_per_s": 0.1},
}


def _files(tmp_path: Path, limits: dict[str, Any]) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    profiles, constraints = tmp_path / "profiles.yaml", tmp_path / "constraints.yaml"
    profiles.write_text(yaml.safe_dump(QUICK))
    constraints.write_text(yaml.safe_dump(limits))
    return profiles, constraints


def _loadtest(url: str, tmp_path: Path, limits: dict[str, Any], *extra: str) -> int:
    from qaserve.cli import main

    profiles, constraints = _files(tmp_path, limits)
    argv = ["loadtest", "--url", url, "--profile", "quick", "--profiles", str(profiles)]
    argv += ["--constraints", str(constraints), "--data", str(FIXTURE), "--out", str(tmp_path)]
    return main([*argv, *extra])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_headless_run_against_the_app(
    tiny_engine_config: Any, serve_app: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qaserve.config import ApiKey, ServerConfig
    from qaserve.runtime.api import build_app
    from qaserve.runtime.local import local_pipeline

    engine = tiny_engine_config.model_copy(update={"data_dir": tmp_path / "store"})
    backend = local_pipeline(engine, workers=2)
    try:
        key = "loadtest-key-0001"
        cfg = ServerConfig(api_keys=[ApiKey(key=key, write=True)])
        url = serve_app(build_app(backend, cfg))
        assert _loadtest(url, tmp_path / "pass", LIMITS, "--api-key", key) == 0
        out = capsys.readouterr().out
        assert "PASSED" in out and "| query:extractive |" in out
        run = tmp_path / "pass" / "locust"
        for name in ("report.html", "locust_stats.csv", "samples.jsonl", "latency.png"):
            assert (run / name).stat().st_size > 0, name
        stats = read_locust_stats(run / "locust_stats.csv")
        assert stats["query:extractive"].requests > 0 and stats["documents:write"].requests > 0
        assert stats["generate:first-token"].p50_ms <= stats["generate:stream"].p50_ms

        # A limit below what was just measured: exit 1, and the broken limit is named.
        tight = {**LIMITS, "routes": {"query:extractive": {"p50_ms": 0.01}}}
        rc = _loadtest(url, tmp_path / "fail", tight, "--api-key", key, "--no-ingest")
        assert rc == 1
        assert "query:extractive: p50_ms" in capsys.readouterr().err

        # Without the key, every request fails and the run says so.
        assert _loadtest(url, tmp_path / "nokey", LIMITS, "--no-ingest") == 1
        assert "error_ratio" in capsys.readouterr().err
    finally:
        backend.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_headless_run_against_the_baseline(
    tiny_engine_config: Any, serve_app: Any, tmp_path: Path
) -> None:
    import torch

    from qaserve.config import packaged_embedder
    from qaserve.loadtests.baseline import Baseline, build_app

    threads = torch.get_num_threads()  # the baseline sets torch's process-wide thread count
    checkpoint = Path(tiny_engine_config.reader.model).parent / "checkpoint"
    try:
        baseline = Baseline(
            str(checkpoint), packaged_embedder(), tiny_engine_config.generator.model, 1
        )
        url = serve_app(build_app(baseline))
        assert _loadtest(url, tmp_path, LIMITS) == 0
    finally:
        torch.set_num_threads(threads)
    stats = read_locust_stats(tmp_path / "locust" / "locust_stats.csv")
    assert stats["read"].requests > 0 and stats["generate:stream"].failures == 0


def test_refuses_remote_targets(capsys: pytest.CaptureFixture[str]) -> None:
    from qaserve.cli import main

    assert main(["loadtest", "--url", "http://192.0.2.1:8000"]) == 2
    assert "loopback only" in capsys.readouterr().err


# --- loadtest-compare: systems from another source tree ---------------------------------------


def _tree(tmp_path: Path) -> Path:
    """A source tree laid out as installed: a `qaserve` package that says where it is."""
    pkg = tmp_path / "old" / "qaserve"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHERE = 'old tree'\n")
    return pkg.parent


def test_parse_system_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qaserve.loadtests.compare import System, parse_system, parse_systems

    src = _tree(tmp_path)
    config = tmp_path / "graph.yaml"
    config.write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    assert parse_system("graph-fixed") == System("graph-fixed")
    # A file is made absolute; a bare name is left for the serving tree to resolve.
    assert parse_system("new=graph.yaml") == System("new", str(config))
    assert parse_system(f"old=local.yaml@{src}") == System("old", "local.yaml", src)
    assert parse_system(f" old = graph.yaml @ {src} ") == System("old", str(config), src)
    systems = parse_systems(f"old=local.yaml@{src},new=local.yaml, baseline")
    assert [s.name for s in systems] == ["old", "new", "baseline"]
    for bad in ("nope", "=local.yaml", "x=", f"x=@{src}", "x=local.yaml@", "a/b=local.yaml"):
        with pytest.raises(ValueError):
            parse_system(bad)
    with pytest.raises(ValueError, match="no qaserve package"):
        parse_system(f"old=local.yaml@{tmp_path}")
    with pytest.raises(ValueError, match="more than once"):
        parse_systems("a=local.yaml,a=other.yaml")


def test_server_from_another_tree_imports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SRC_DIR goes first on the server's PYTHONPATH, and wins over the venv's editable
    install of qaserve (whose finder Python consults after the path)."""
    import subprocess
    import sys

    from qaserve.loadtests import compare, run

    src = _tree(tmp_path)
    env = run.src_env(src, {"PYTHONPATH": "/elsewhere", "KEEP": "1"})
    assert env == {"PYTHONPATH": f"{src}:/elsewhere", "KEEP": "1"}
    assert run.src_env(None) is None
    code = "import qaserve; print(getattr(qaserve, 'WHERE', 'this tree'), qaserve.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=run.src_env(src), capture_output=True, text=True
    )
    assert out.stdout.split()[:2] == ["old", "tree"], out.stderr
    assert out.stdout.split()[-1] == str(src / "qaserve" / "__init__.py")

    started: dict[str, Any] = {}

    def fake_start(cmd: list[str], port: int, log: Path, timeout_s: float, env: Any) -> str:
        started.update(cmd=cmd, env=env)
        return "server"

    monkeypatch.setattr(run.ServerProcess, "start", staticmethod(fake_start))
    system = compare.parse_system(f"old=local.yaml@{src}")
    started_as = cast(Any, compare.start_system(system, tmp_path, None))  # fake_start's marker
    assert started_as == "server"
    assert started["cmd"][started["cmd"].index("--config") + 1] == "local.yaml"
    assert started["env"]["PYTHONPATH"].split(":")[0] == str(src)
    compare.start_system(compare.parse_system("new=local.yaml"), tmp_path, None)
    assert started["env"] is None  # this install, the caller's environment


def test_compare_ratios_against_a_chosen_baseline(tmp_path: Path) -> None:
    from qaserve.loadtests.compare import render
    from qaserve.loadtests.report import StepStats

    def rows(rps: float, p95: float) -> list[StepStats]:
        return [
            StepStats(i, u, 25, int(rps * 25), 0, rps, p95 / 2, p95 * u, p95 * u, {"200": 1})
            for i, u in enumerate((1, 16))
        ]

    merged = {"old": rows(10.0, 200.0), "new": rows(15.0, 100.0)}
    text = render(merged, "t", 5000, tmp_path, baseline="old")
    assert "against old" in text
    assert "15.00 (1.50x)" in text  # req/s within the p95 budget, new / old
    assert "| 16 | 1.50x | 0.50x |" in text  # per step: req/s and p95, new / old
    assert (tmp_path / "compare.md").exists()
