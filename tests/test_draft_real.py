"""Drafts on the real SmolLM2-135M over loopback (slow): `--draft lookup` gives `--draft none`'s
tokens in fewer passes on a prompt that quotes text back.

Strict sync (every part awaited), because the claim is about the numbers: on a loaded machine a
relaxed part can miss its deadline at 0% loss, and its compensation would change the reply
whatever the draft."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow
QUOTE = ("The list of colours: red, green, blue, yellow, orange, purple, pink, brown, black, white.\n"
         "The same list of colours again: red, green,")


@pytest.fixture(scope="module")
def pi5_plan(tmp_path_factory) -> Path:
    """The checked-in pi5 plan with its shards: artifacts/ after `make plans`, else compiled here."""
    checked_in = ROOT / "artifacts" / "smollm2-135m-pi5"
    if all((checked_in / f"shard-pi5-{i}.safetensors").exists() for i in range(4)):
        return checked_in
    from halo_compile.pipeline import CompileOptions, compile_plan

    root = tmp_path_factory.mktemp("pi5")
    _, out = compile_plan("smollm2-135m", ROOT / "profiles" / "pi5.yaml", root / "plan", CompileOptions(progress=False))
    return Path(out)


def local(plan: Path, draft: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "local", "--plan", str(plan), "--prompt", QUOTE,
                           "--plr", "0", "--max-tokens", "64", "--json", "--quiet", "--draft", draft,
                           "--sync", "strict"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_lookup_drafts_keep_the_tokens_in_fewer_passes(pi5_plan):
    none, lookup = local(pi5_plan, "none"), local(pi5_plan, "lookup")
    assert lookup["tokens"] == none["tokens"]
    assert none["tokens_per_pass"] == 1.0 and lookup["tokens_per_pass"] > 1
    assert lookup["draft"]["source"] == "lookup" and lookup["draft"]["acceptance"] > 0
