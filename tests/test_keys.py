"""Deployment keys on disk: the compiler writes a private one beside the plan and keeps it on
recompiling; a worker without a usable key refuses to start with one line. (A coordinator with the
wrong key against live workers: test_hardening.py.)
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from halo_runtime.core.plan import PLAN_FILE, load_plan
from halo_runtime.core.plandir import KEY_FILE, MANIFEST_FILE, TOKENIZER_FILE, read_key
from halo_runtime.core.shards import load_shard
from test_hardening import _halo_run, _one_error_line


def test_compiled_plan_has_a_private_key_outside_the_manifest(plan_dir):
    path = plan_dir / KEY_FILE
    assert len(read_key(path)) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KEY_FILE not in json.loads((plan_dir / MANIFEST_FILE).read_text())["files"]
    assert subprocess.run(["git", "check-ignore", "-q", f"artifacts/x/{KEY_FILE}"],
                          cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_recompile_keeps_the_key_and_the_plan_bytes(plan_dir, tmp_path):
    from halo_compile.emit import emit

    plan = load_plan(plan_dir)
    shards = {d: load_shard(plan_dir, plan, d) for d in plan.device_names}
    out = tmp_path / "plan"
    emit(out, plan, shards, plan_dir / TOKENIZER_FILE)
    first = read_key(out / KEY_FILE)
    files = {n: (out / n).read_bytes() for n in (PLAN_FILE, MANIFEST_FILE)}
    emit(out, plan, shards, plan_dir / TOKENIZER_FILE)
    assert read_key(out / KEY_FILE) == first
    assert {n: (out / n).read_bytes() for n in files} == files
    assert files[MANIFEST_FILE] == (plan_dir / MANIFEST_FILE).read_bytes()
    (out / KEY_FILE).write_text("not a key\n")
    with pytest.raises(ValueError, match="not a HALO key"):
        emit(out, plan, shards, plan_dir / TOKENIZER_FILE)


def test_worker_without_a_key_refuses_to_start(plan_dir, tmp_path):
    copy = tmp_path / "plan"
    shutil.copytree(plan_dir, copy)
    (copy / KEY_FILE).unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("HALO_KEY", "HALO_KEY_FILE")}
    r = _halo_run("worker", "--plan", str(copy), "--device", "dev1", "--bind", "127.0.0.1:0", env=env)
    _one_error_line(r, "no deployment key", KEY_FILE)
    bad = tmp_path / "bad.key"
    bad.write_text("zz\n")
    r = _halo_run("worker", "--plan", str(copy), "--device", "dev1", "--key-file", str(bad), env=env)
    _one_error_line(r, str(bad), "not a HALO key")
    r = _halo_run("worker", "--plan", str(copy), "--device", "dev1", env={**env, "HALO_KEY": "abc"})
    _one_error_line(r, "$HALO_KEY", "not a HALO key")
