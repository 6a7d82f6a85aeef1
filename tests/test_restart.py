"""A restart after kill -9: `qaserve serve` claims its data dir, and a start that finds the
claim of a dead server kills what that server left running (by the instance id in their
environment), and nothing else. A live server's data dir is refused at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qaserve.runtime.instance import ENV, LOCK, DataDirBusy, claim


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV, raising=False)  # claim() marks this process's environment
    yield


def _sleeper(instance: str) -> subprocess.Popen[bytes]:
    """A process as Ray starts them: the instance id inherited, a process group of its own."""
    env = os.environ | {ENV: instance}
    code = "import time; time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_start_after_a_kill_reaps_the_killed_servers_processes(tmp_path: Path) -> None:
    # What a kill -9 leaves: the claim of a server whose driver is gone, its workers alive.
    (tmp_path / LOCK).write_text(json.dumps({"instance": "killed", "pid": _dead_pid()}))
    orphans = [_sleeper("killed"), _sleeper("killed")]
    other = _sleeper("another-server")
    try:
        instance = claim(tmp_path)
        try:
            for proc in orphans:
                assert proc.wait(10) == -9
            assert len(instance.reaped) == 2 and all("python" in n for n in instance.reaped)
            assert other.poll() is None, "a process of another instance was killed"
            assert os.environ[ENV] == instance.id != "killed"
            record = json.loads((tmp_path / LOCK).read_text())
            assert (record["instance"], record["pid"]) == (instance.id, os.getpid())
        finally:
            instance.release()
    finally:
        for proc in [*orphans, other]:
            proc.kill()
            proc.wait()


def test_a_data_dir_in_use_is_refused_and_free_again_after(tmp_path: Path) -> None:
    first = claim(tmp_path)
    try:
        with pytest.raises(DataDirBusy, match=f"pid {os.getpid()}"):
            claim(tmp_path)
    finally:
        first.release()
    second = claim(tmp_path)  # a clean stop leaves nothing to reap
    second.release()
    assert second.reaped == [] and second.previous_pid == os.getpid()
