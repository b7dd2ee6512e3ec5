"""specbench.artifacts (atomic writes, hashes, stamps, the environment fingerprint) and specbench.logs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from datetime import datetime

import pytest

from specbench import artifacts as A
from specbench import logs

# ---------------------------------------------------------------- durable writes


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "r.json"  # the directory is created
    A.write_json(p, {"a": 1})
    A.write_json(p, {"b": [1, 2]})
    assert json.loads(p.read_text()) == {"b": [1, 2]} and p.read_text().endswith("\n")
    assert [x.name for x in p.parent.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "r.json"
    A.write_json(p, {"old": True})
    with pytest.raises(TypeError):
        A.write_json(p, {"bad": object()})  # not serialisable: fails before anything is replaced
    with pytest.raises(RuntimeError), A.atomic_path(p) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"old": True}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        A.write_text(tmp_path / "a.txt", "x")
        with A.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("a.txt", "b.bin")} == {0o644}  # not mkstemp's 0600


# ---------------------------------------------------------------- hashes


def test_hashes(tmp_path):
    (tmp_path / "b.bin").write_bytes(b"bee")
    (tmp_path / "a.bin").write_bytes(b"ay")
    assert A.sha256_bytes(b"ay") == hashlib.sha256(b"ay").hexdigest() == A.sha256_file(tmp_path / "a.bin")
    assert A.sha256_json({"x": 1, "y": [2]}) == A.sha256_json({"y": [2], "x": 1})
    listing = f"{hashlib.sha256(b'ay').hexdigest()}  a.bin\n{hashlib.sha256(b'bee').hexdigest()}  b.bin\n"
    assert A.sha256_files([tmp_path / "b.bin", tmp_path / "a.bin"]) == hashlib.sha256(listing.encode()).hexdigest()


def test_stamped_sha256_trusts_the_stamp_until_the_file_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    assert A.stamped_sha256(f) == A.sha256_bytes(b"one")
    stamp = json.loads(A.stamp_path(f).read_text())
    assert stamp["size"] == 3
    A.write_json(A.stamp_path(f), {**stamp, "sha256": "remembered"}, indent=None)
    assert A.stamped_sha256(f) == "remembered"  # unchanged size and mtime: not re-read
    f.write_bytes(b"other")
    assert A.stamped_sha256(f) == A.sha256_bytes(b"other")


# ---------------------------------------------------------------- stamps


def test_environment_fingerprint():
    env = A.environment("cpu")
    for key in ("date", "python", "platform", "torch", "transformers", "specbench", "git_commit", "cpu", "cpu_isa",
                "cpu_count", "threads", "gpu", "cuda"):
        assert key in env
    assert env["gpu"] is None and env["threads"] >= 1 and env["cpu"]
    assert datetime.fromisoformat(env["date"]).utcoffset().total_seconds() == 0
    assert env["git_commit"] is None or len(env["git_commit"].removesuffix("-dirty")) == 40
    json.dumps(env)


def test_environment_records_the_fast_runtime_kernel_plan(monkeypatch):
    """Only a plan this process made: the fingerprint never starts a calibration."""
    from specbench.models import fast_runtime

    monkeypatch.setattr(fast_runtime, "_plan", None)
    assert A.environment("cpu")["fast_kernel_plan"] is None and fast_runtime._plan is None
    monkeypatch.setattr(fast_runtime, "_plan", fast_runtime.parse_plan("1:gemv,3:packed@4"))
    plan = A.environment("cpu")["fast_kernel_plan"]
    assert plan.startswith("1:gemv,2:packed,3:packed@4,") and fast_runtime.parse_plan(plan) == fast_runtime._plan


def _git(d, *args):
    subprocess.run(["git", "-C", str(d), *args], check=True, capture_output=True)


def test_git_commit_is_only_specbench_checkouts(tmp_path, monkeypatch):
    """A copy installed inside some other repository records no commit; a checkout records its own."""
    repo = tmp_path / "project"
    (repo / "venv" / "specbench").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    monkeypatch.setattr(A, "__file__", str(repo / "venv" / "specbench" / "artifacts.py"))
    assert A.git_commit() is None  # inside the user's repository, not its top level
    monkeypatch.setattr(A, "__file__", str(repo / "specbench" / "artifacts.py"))
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert A.git_commit() == head.strip()


# ---------------------------------------------------------------- logging


@pytest.fixture
def restore_logging():
    yield
    logs.configure()


def test_log_lines_go_to_stderr_as_specbench_lines(capsys, tmp_path, restore_logging):
    log = logging.getLogger("specbench.some.module")
    log.info("fetching %s", "x")
    log.debug("not shown")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "specbench: fetching x\n"

    logs.configure(timestamps=True)
    with logs.log_file(tmp_path / "train.log"):
        log.info("step 1")
    log.info("after")
    err = capsys.readouterr().err.splitlines()
    assert [re.sub(r"\d\d:\d\d:\d\d", "T", line) for line in err] == ["specbench: [T] step 1", "specbench: [T] after"]
    logged = (tmp_path / "train.log").read_text()  # only what was logged inside the block
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] step 1\n", logged)
