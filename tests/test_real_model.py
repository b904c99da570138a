"""The real SmolLM2-135M, end to end: compiled for 1, 2 and 4 devices, executed over loopback UDP
with an fp32 wire, it generates exactly transformers' greedy tokens; and the checked-in plan is
reproduced byte for byte.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cluster_yaml
from halo_runtime.core.coordinator import Coordinator, TokenStats
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.shards import load_shard
from halo_runtime.core.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
TOKENS = 32


@pytest.fixture(scope="module")
def hf_reference(builtin_model):
    """transformers' own greedy tokens and per-step logits (numpy) for PROMPT."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(builtin_model.tokenizer_file.parent), torch_dtype=torch.float32)
    model.eval()
    prompt = Tokenizer.from_file(builtin_model.tokenizer_file).encode(PROMPT)
    # a plain greedy loop over raw logits: generate()'s processors (e.g. min_new_tokens) alter them
    tokens, logits, past, feed = [], [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(TOKENS):
            out = model(feed, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].numpy())
            tokens.append(int(logits[-1].argmax()))
            feed = torch.tensor([[tokens[-1]]])
    return prompt, tokens, logits


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}dev")
def real_plan(request, tmp_path_factory):
    from halo_compile.pipeline import CompileOptions, compile_plan

    root = tmp_path_factory.mktemp(f"real-{request.param}")
    (root / "cluster.yaml").write_text(cluster_yaml(request.param, lossy=1 if request.param > 2 else 0,
                                                    coordinator_gflops=1.0, base_port=7900))
    opts = CompileOptions(calib_tokens=512, chunk_tokens=256, sample_tokens=256, mlp_groups=7,
                          max_context=512, solver_time=2.0, progress=False)
    return compile_plan("smollm2-135m", root / "cluster.yaml", root / "plan", opts)


def test_real_model_matches_transformers_in_process(real_plan, hf_reference):
    plan, directory = real_plan
    prompt, tokens, logits = hf_reference
    assert len({g.device for g in plan.groups}) == len(plan.devices)  # every device computes
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards))
    gen = coord.generate(prompt, TOKENS, keep_logits=True)
    assert gen.tokens == tokens
    for ours, ref in zip(gen.logits, logits):
        assert float(np.abs(ours - ref).max()) <= 1e-3 * float(np.abs(ref).max())


def test_real_model_over_udp_fp32_gives_transformers_tokens(real_plan, hf_reference):
    plan, directory = real_plan
    _, tokens, _ = hf_reference
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "local", "--plan", str(directory),
                           "--prompt", PROMPT, "--max-tokens", str(TOKENS), "--wire", "fp32", "--plr", "0",
                           "--ignore-eos", "--json", "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["tokens"] == tokens


def test_fp16_wire_agreement(real_plan, hf_reference):
    """fp16 on the wire rounds every partial sum; report how close it stays (docs/ACCURACY.md)."""
    plan, directory = real_plan
    prompt, tokens, logits = hf_reference
    if len(plan.devices) == 1:
        pytest.skip("nothing crosses the wire")
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards, wire="fp16"))
    # teacher-forced on the reference tokens so every position is compared on the same context
    coord.reset(1)
    feed, agree, worst = list(prompt), 0, 0.0
    for step, ref_token in enumerate(tokens):
        ours = coord.forward(feed, step, TokenStats())
        agree += int(np.argmax(ours)) == ref_token
        worst = max(worst, float(np.abs(ours - logits[step]).max() / np.abs(logits[step]).max()))
        feed = [ref_token]
    print(f"\nfp16 wire, {len(plan.devices)} devices: top-1 agreement {agree}/{len(tokens)}, "
          f"max relative logit error {worst:.2e}")
    assert agree >= len(tokens) - 2 and worst < 2e-2


CHECKED_IN = ROOT / "artifacts" / "smollm2-135m-pi5"


def _same_bytes(out: Path) -> None:
    # manifest.json holds every shard's sha256: equal manifests mean equal shards
    for name in ("plan.json", "manifest.json"):
        assert (out / name).read_bytes() == (CHECKED_IN / name).read_bytes(), f"{name} differs from the checked-in one"


def test_checked_in_plan_is_reproduced_byte_for_byte(pi5_plan):
    """The plan and manifest under artifacts/ come out of the default compile, bit for bit."""
    _same_bytes(Path(pi5_plan[1]))


def test_the_same_plan_with_torchs_plain_c_kernels(tmp_path):
    """Issue 25: a compile whose torch kernels are plain C (`ATEN_CPU_CAPABILITY=default`: other sums,
    other exp and sin than the AVX2 kernels the checked-in plan was compiled with) writes the same
    bytes (halo_compile.floats)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-m", "halo_compile.cli", "plan", "smollm2-135m", "--cluster",
                    str(ROOT / "profiles" / "pi5.yaml"), "-o", str(tmp_path / "plan"), "-q"],
                   env=env, check=True, cwd=ROOT)
    _same_bytes(tmp_path / "plan")
