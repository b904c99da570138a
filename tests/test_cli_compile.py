"""`halo-compile` as a user runs it: inspect and verify a compiled plan, catch a damaged shard, and turn
every user mistake in `plan` into one line on stderr and exit code 2, without touching an existing
output directory."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import cluster_yaml

from halo_compile.cli import EXIT_USER_ERROR, main

# the installed console script next to this interpreter; `python -m` where it is not installed
_SCRIPT = Path(sys.executable).with_name("halo-compile")
HALO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "halo_compile.cli"]
FAST = ["--calib-tokens", "256", "--groups", "4", "--solver-time", "1", "-q"]


def halo(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*HALO, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1
    except TypeError:
        return CliRunner()                  # click >= 8.2 keeps stderr apart by default


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The same command in this process (no interpreter start-up): fast, for the many error cases.

    An exception that escapes the command (a bug, which a user would see as a traceback) comes back
    as exit code 1 with the traceback on stderr, so `assert_user_error` fails on it as it should."""
    import traceback

    r = _runner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*r.exc_info))
    return subprocess.CompletedProcess(["halo-compile", *map(str, args)], r.exit_code, r.stdout, stderr)


def assert_user_error(r: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2, exactly one line on stderr starting 'halo-compile: error:', no traceback."""
    assert r.returncode == EXIT_USER_ERROR == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("halo-compile: error: "), lines[0]
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under directory, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def good_profile(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text(cluster_yaml(4, lossy=1))
    return f


# ---- inspect --------------------------------------------------------------------------------------

def test_inspect(plan_dir, tiny_plan, tmp_path):
    plan = tiny_plan[0]
    r = halo("inspect", plan_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in plan.device_names:
        assert name in r.stdout
    assert "dev0*" in r.stdout                                  # the coordinator is marked
    assert "expected lost importance" in r.stdout
    assert "loss-blind" in r.stdout
    assert f"{len(plan.devices)} devices, coordinator dev0" in r.stdout
    assert "solver: " in r.stdout and "predictor: rank" in r.stdout
    assert r.stderr == ""


def test_inspect_prints_the_report_of_the_file(plan_dir):
    from halo_runtime.core.plan import load_plan

    from halo_compile.report import inspect_text
    from halo_runtime.core.plandir import VIEW_FILE, read_manifest

    r = cli("inspect", plan_dir)
    assert r.returncode == 0, r.stderr
    view = read_manifest(plan_dir)[VIEW_FILE]["bytes"]
    assert r.stdout == inspect_text(load_plan(plan_dir), view) + "\n" and "push rounds also map the view" in r.stdout


def test_inspect_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("inspect", tmp_path / "empty", cwd=tmp_path), str(tmp_path / "empty" / "plan.json"),
                      "no plan here")


# ---- verify ---------------------------------------------------------------------------------------

def test_verify_passes(plan_dir, tmp_path):
    r = halo("verify", plan_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("ok") for line in lines)
    assert "manifest: 8 files match their SHA-256" in lines[0]   # plan, tokenizer and its config, view, 4 shards
    assert "reassemble to the plan's model" in lines[1]


def test_verify_with_model_passes(plan_dir, tiny_vocab_dir, tmp_path):
    r = cli("verify", plan_dir, "--model", tiny_vocab_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("ok") for line in lines)
    assert f"every weight of {tiny_vocab_dir} is held exactly once, bit for bit" in lines[2]


def test_verify_against_another_model_fails(plan_dir, tiny_llama_dir, tmp_path):
    other = tiny_llama_dir(seed=0)
    assert_user_error(cli("verify", plan_dir, "--model", other, cwd=tmp_path), str(plan_dir), str(other))


def _largest_worker_shard(directory: Path) -> Path:
    shards = [p for p in directory.glob("shard-*.safetensors") if p.name != "shard-dev0.safetensors"]
    return max(shards, key=lambda p: p.stat().st_size)


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte(plan_copy, tmp_path):
    shard = _largest_worker_shard(plan_copy)
    _flip(shard, shard.stat().st_size // 2)
    line = assert_user_error(halo("verify", plan_copy, cwd=tmp_path), "SHA-256")
    assert line == (f"halo-compile: error: {shard}: SHA-256 does not match manifest.json (damaged in the copy, or from "
                    "another compile; copy the whole plan directory again)")


def test_verify_catches_changed_weights_behind_a_forged_manifest(plan_copy, tmp_path):
    """Flip a weight bit and update manifest.json to match: the reassembled fingerprint still differs."""
    shard = _largest_worker_shard(plan_copy)
    _flip(shard, shard.stat().st_size - 4)                  # lowest mantissa byte of the last fp32 value
    manifest = json.loads((plan_copy / "manifest.json").read_text())
    manifest["files"][shard.name]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (plan_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(cli("verify", plan_copy, cwd=tmp_path), str(plan_copy), "reassemble to fingerprint")


def test_verify_missing_shard(plan_copy, tmp_path):
    (plan_copy / "shard-dev1.safetensors").unlink()
    assert_user_error(cli("verify", plan_copy, cwd=tmp_path), "shard-dev1.safetensors",
                      "missing (recompile or copy it here)")


# ---- plan: user errors ----------------------------------------------------------------------------

def test_plan_nonexistent_model(tmp_path, good_profile):
    missing = tmp_path / "no-such-model"
    assert_user_error(halo("plan", missing, "--cluster", good_profile, "-o", tmp_path / "out", *FAST, cwd=tmp_path),
                      str(missing), "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_plan_directory_that_is_not_a_checkpoint(tmp_path, good_profile):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README.txt").write_text("not a model\n")
    assert_user_error(cli("plan", d, "--cluster", good_profile, "-o", tmp_path / "out", *FAST, cwd=tmp_path),
                      str(d), "not a checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, parts", [
    (lambda t: t.replace("loss: 0.05", "loss: 1.0"), ["devices[3] (dev3).loss", "outside [0, 1)"]),
    (lambda t: t.replace("memory_mb: 4096,", "memory_mb: '4096',", 1), ["devices[0] (dev0).memory_mb",
                                                                        "expected a number"]),
    (lambda t: t.replace("coordinator: dev0", "coordinator: dev9"), ["coordinator", "'dev9'"]),
    (lambda t: t + "colour: red\n", ["unknown key 'colour'"]),
], ids=["loss", "memory-string", "coordinator", "unknown-key"])
def test_plan_bad_profile(tmp_path, tiny_vocab_dir, edit, parts):
    f = tmp_path / "bad.yaml"
    f.write_text(edit(cluster_yaml(4, lossy=1)))
    assert_user_error(cli("plan", tiny_vocab_dir, "--cluster", f, "-o", tmp_path / "out", *FAST, cwd=tmp_path),
                      str(f), *parts)
    assert not (tmp_path / "out").exists()


def test_plan_missing_profile(tmp_path, tiny_vocab_dir):
    assert_user_error(cli("plan", tiny_vocab_dir, "--cluster", tmp_path / "nope.yaml", *FAST, cwd=tmp_path),
                      str(tmp_path / "nope.yaml"), "no such profile")


def test_plan_cluster_too_small(tmp_path, tiny_vocab_dir):
    f = tmp_path / "small.yaml"
    f.write_text(cluster_yaml(4, lossy=1, memory_mb=0.1))
    line = assert_user_error(cli("plan", tiny_vocab_dir, "--cluster", f, "-o", tmp_path / "out", *FAST,
                                 cwd=tmp_path), "MB")
    assert "needs" in line and "dev0" in line                    # the embeddings alone (131 kB) outgrow 0.1 MB
    assert not (tmp_path / "out").exists()


def test_plan_missing_calibration_file(tmp_path, tiny_vocab_dir, good_profile):
    calib = tmp_path / "no-such-text.txt"
    assert_user_error(cli("plan", tiny_vocab_dir, "--cluster", good_profile, "-o", tmp_path / "out",
                           "--calib", calib, *FAST, cwd=tmp_path), str(calib), "no such file")
    assert not (tmp_path / "out").exists()


def test_plan_bad_option_is_a_usage_error(tmp_path, tiny_vocab_dir, good_profile):
    r = cli("plan", tiny_vocab_dir, "--cluster", good_profile, "--relaxed-share", "1.5", "-q", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "relaxed_share" in r.stderr


# ---- an existing output directory survives a failed compile ---------------------------------------

@pytest.fixture
def existing_out(plan_dir, tmp_path):
    out = tmp_path / "site" / "out"
    shutil.copytree(plan_dir, out)
    (out / "NOTES.md").write_text("my notes, not the compiler's\n")
    return out


@pytest.mark.parametrize("failure", ["cluster-too-small", "missing-calib", "bad-profile"])
def test_failed_compile_leaves_existing_out_dir_alone(existing_out, tmp_path, tiny_vocab_dir, failure):
    before = snapshot(existing_out)
    siblings = sorted(os.listdir(existing_out.parent))
    profile = tmp_path / "c.yaml"
    profile.write_text(cluster_yaml(4, lossy=1, memory_mb=0.1 if failure == "cluster-too-small" else 4096,
                                    loss=1.0 if failure == "bad-profile" else 0.05))
    extra = ["--calib", tmp_path / "missing.txt"] if failure == "missing-calib" else []
    assert_user_error(cli("plan", tiny_vocab_dir, "--cluster", profile, "-o", existing_out, *extra, *FAST,
                           cwd=tmp_path))
    assert snapshot(existing_out) == before
    assert (existing_out / "NOTES.md").read_text() == "my notes, not the compiler's\n"
    assert sorted(os.listdir(existing_out.parent)) == siblings    # no .out.tmp-* / .out.old-* left behind
    assert cli("verify", existing_out, cwd=tmp_path).returncode == 0


def test_compile_failing_while_writing_leaves_existing_out_dir_alone(existing_out, tiny_vocab_dir, good_profile,
                                                                    monkeypatch):
    """The disk fills up while the second shard is written: the old plan stays, nothing half-written appears."""
    from halo_compile.shardwriter import ShardWriter

    real_finish, calls = ShardWriter.finish, []

    def failing_finish(self):
        calls.append(self.path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_finish(self)

    monkeypatch.setattr(ShardWriter, "finish", failing_finish)
    before = snapshot(existing_out)
    siblings = sorted(os.listdir(existing_out.parent))
    r = _runner().invoke(main, ["plan", str(tiny_vocab_dir), "--cluster", str(good_profile),
                                  "-o", str(existing_out), *map(str, FAST)])
    assert len(calls) == 2, "the compile should have reached the shard writer"
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == "halo-compile: error: [Errno 28] No space left on device"
    assert snapshot(existing_out) == before
    assert sorted(os.listdir(existing_out.parent)) == siblings


def test_successful_recompile_keeps_user_files(existing_out, tmp_path, tiny_vocab_dir, good_profile):
    """A compile over an existing plan replaces the compiler's files, keeps the user's, drops stale shards."""
    (existing_out / "shard-gone.safetensors").write_bytes(b"stale")
    r = halo("plan", tiny_vocab_dir, "--cluster", good_profile, "-o", existing_out, *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"wrote {existing_out}/" in r.stdout and "4 shards" in r.stdout
    assert (existing_out / "NOTES.md").read_text() == "my notes, not the compiler's\n"
    assert not (existing_out / "shard-gone.safetensors").exists()
    assert sorted(os.listdir(existing_out.parent)) == ["out"]
    v = cli("verify", existing_out, "--model", tiny_vocab_dir)
    assert v.returncode == 0, v.stderr
    assert len(v.stdout.strip().splitlines()) == 3
