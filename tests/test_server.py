"""`qaserve serve` end to end (a real subprocess: local Ray, the graph, SIGTERM) and the Serve
config files, which must match what the code generates and what Ray's schema accepts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from qaserve.loaders import sample_documents
from qaserve.runtime.graph_config import GraphConfig
from qaserve.runtime.server import CONFIG_DIR, free_port, render_serve_config
from qaserve.stages import DEPLOYMENTS as STAGES

REPO = Path(__file__).resolve().parents[1]


def test_committed_serve_config_is_generated_from_the_code() -> None:
    committed = (CONFIG_DIR / "serve-local.yaml").read_text()
    assert committed == render_serve_config("local.yaml"), (
        "serve/configs/serve-local.yaml drifted: run "
        "`qaserve serve-config --config local.yaml > serve/configs/serve-local.yaml`"
    )


def test_serve_config_passes_rays_schema_and_ours() -> None:
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((CONFIG_DIR / "serve-local.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "qaserve.runtime.graph:app"
    assert [d.name for d in app.deployments] == list(STAGES)
    graph = GraphConfig.load(CONFIG_DIR / "local.yaml")
    # With every autoscaled stage at its maximum the CPU grants still fit 2 cores.
    total = 0.0
    for opts in graph.stages.values():
        replicas = (opts.autoscaling_config or {}).get("max_replicas", opts.num_replicas or 1)
        total += replicas * opts.ray_actor_options.get("num_cpus", 1)
    assert total <= 2.0 + 1e-9, total


def test_embedded_store_has_one_owner() -> None:
    with pytest.raises(ValueError, match="one owner"):
        GraphConfig.model_validate({"stages": {"Retriever": {"num_replicas": 2}}})
    ok = GraphConfig.model_validate(
        {
            "engine": {"store": {"url": "http://qdrant:6333"}},
            "stages": {"Retriever": {"num_replicas": 2}},
        }
    )
    assert ok.stages["Retriever"].num_replicas == 2
    with pytest.raises(ValueError, match="unknown stages"):
        GraphConfig.model_validate({"stages": {"Rerankr": {}}})


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    tree: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        tree.setdefault(parent, []).append(child)
    found, stack = set(), [pid]
    while stack:
        for c in tree.get(stack.pop(), []):
            found.add(c)
            stack.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_qaserve_serve_answers_and_stops_cleanly_on_sigterm(
    tiny_engine_config: Any, tmp_path: Path
) -> None:
    cfg = {
        "engine": tiny_engine_config.model_dump(mode="json") | {"data_dir": str(tmp_path / "data")},
        "stages": {name: {"ray_actor_options": {"num_cpus": 0.1}} for name in STAGES},
    }
    graph = tmp_path / "graph.yaml"
    graph.write_text(yaml.safe_dump(cfg))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qaserve.cli",
            "serve",
            "--config",
            str(graph),
            "--port",
            str(port),
            "--num-cpus",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 300
        text = ""
        while "serving on" not in text:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(1)
            text = (tmp_path / "serve.log").read_text()
        # Ready only once the Retriever has seeded the empty store with the sample corpus.
        assert f"; {len(sample_documents())} documents)" in text, text[-3000:]
        ask = subprocess.run(
            [
                sys.executable,
                "-m",
                "qaserve.cli",
                "ask",
                "--url",
                url,
                "How is the sound quality?",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ask.returncode == 0, ask.stderr
        answer = json.loads(ask.stdout)
        assert set(answer) == {
            "answer",
            "answers",
            "no_answer_score",
            "generated",
            "documents",
            "timings_ms",
        }
        assert answer["documents"], "the sample corpus was not retrieved"
        family = _children(proc.pid)
        assert family, "Ray started no processes"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "stopping" in (tmp_path / "serve.log").read_text()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in family if _alive(p)], "Ray processes outlived `qaserve serve`"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autoscaling_up_then_down(tiny_engine_config: Any, tmp_path: Any) -> None:
    """`qaserve autoscale-demo`: the Reader on a short-delay autoscaling config goes from 1
    replica to 2 under load and back to 1 after it (its own Ray, as a user would run it)."""
    import subprocess
    import sys

    import yaml

    from qaserve.stages import DEPLOYMENTS as STAGES

    engine = tiny_engine_config.model_dump(mode="json") | {"data_dir": str(tmp_path / "data")}
    stages = {name: {"ray_actor_options": {"num_cpus": 0.1}} for name in STAGES}
    graph_yaml = tmp_path / "graph.yaml"
    graph_yaml.write_text(yaml.safe_dump({"engine": engine, "stages": stages}))
    cmd = [sys.executable, "-m", "qaserve.cli", "autoscale-demo", "--config", str(graph_yaml)]
    cmd += ["--load-s", "45", "--cool-s", "60", "--concurrency", "8", "--port", str(free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    lines = [ln for ln in out.stdout.splitlines() if "replicas=" in ln]
    counts = [int(ln.split("replicas=")[1].split()[0]) for ln in lines]
    assert out.returncode == 0, "\n".join(lines) + out.stderr[-2000:]
    assert max(counts) == 2 and counts[-1] == 1, lines
    peak = counts.index(2)
    assert "load" in lines[peak] and "idle" in lines[-1], lines
