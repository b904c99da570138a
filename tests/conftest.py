"""Shared fixtures: a tiny random LLaMA checkpoint factory, a tiny model with the suite's own
tokenizer (tests/tinytok.py) and its compiled 4-device plan, and the built-in SmolLM2 model, which
only tests marked slow may use (`make test` runs without it).

    def test_x(tiny_llama_dir, tiny_plan):
        d = tiny_llama_dir(tie=True, num_hidden_layers=1)   # an HF dir: config.json + model.safetensors
        plan, directory = tiny_plan                         # compiled once per session
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

# Before torch loads OpenMP (here and in every subprocess a test starts): idle OpenMP threads sleep
# instead of spinning. Same threads, same work split, same numbers; but on the shared 2-core
# machine the spinning burnt most of the suite's CPU (evaluating the tiny plan: 15.6 s of CPU
# spinning, 0.4 s passive) and slowed the processes it shares the cores with.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the compiler pins the instruction set torch and MKL sum with (halo_compile/__init__.py): before
# any test module makes torch compute, so in-process compiles give what `halo-compile` gives
import halo_compile  # noqa: E402,F401
# the live-worker fixtures (tests/liveworkers.py) are a plugin the test modules that use them import:
# its asserts are rewritten like a conftest's
pytest.register_assert_rewrite("liveworkers")

ROOT = Path(__file__).resolve().parents[1]
# `make install` installs halo_runtime (editable); a bare checkout still runs the tests.
if importlib.util.find_spec("halo_runtime") is None:
    sys.path.insert(0, str(ROOT / "runtime"))

TINY_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=256, max_position_embeddings=256,
                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Factory: tiny_llama_dir(seed=0, tie=False, **LlamaConfig overrides) -> Path of a random HF LLaMA dir.

    Weights are drawn with initializer_range 0.1 (not HF's 0.02) so logits are far from zero and
    numeric comparisons mean something. Same arguments -> same directory (built once per session).
    """
    made: dict[tuple, Path] = {}

    def make(seed: int = 0, tie: bool = False, **overrides) -> Path:
        key = (seed, tie, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(seed)
            cfg = LlamaConfig(**{**TINY_CONFIG, "tie_word_embeddings": tie, **overrides})
            model = LlamaForCausalLM(cfg).eval()
            with torch.no_grad():  # HF initialises norms to 1; random norms test that they are applied
                for name, p in model.named_parameters():
                    if p.ndim == 1:
                        p.uniform_(0.5, 1.5)
            path = tmp_path_factory.mktemp(f"tiny-llama-s{seed}{'-tied' if tie else ''}")
            model.save_pretrained(str(path), safe_serialization=True)
            made[key] = path
        return made[key]

    return make


def pytest_collection_modifyitems(items):
    # `make test` (-m "not slow") must run where the real model was never converted
    for item in items:
        if "builtin_model" in item.fixturenames and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the real SmolLM2 (builtin_model) but is not marked slow")


@pytest.fixture(scope="session")
def builtin_model():
    """LoadedModel of smollm2-135m; the conversion is cached under $HALO_CACHE or ~/.cache/halo."""
    from halo_compile.load import load_model

    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def pi5_plan(tmp_path_factory):
    """(plan, directory): the default compile of the built-in model for profiles/pi5.yaml, the one
    under artifacts/ (compiled once per session: the slow tests that need its shards share it)."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    root = Path(__file__).resolve().parents[1]
    return compile_plan("smollm2-135m", root / "profiles" / "pi5.yaml", tmp_path_factory.mktemp("pi5") / "plan",
                        CompileOptions(progress=False))


def cluster_yaml(n: int, *, lossy: int = 0, memory_mb: float = 4096, remote_memory_mb: float | None = None,
                 loss: float = 0.05, coordinator_gflops: float = 0.01, base_port: int = 7800,
                 latency_ms: float = 0.01) -> str:
    """A profile of n loopback devices. The coordinator is made slow so that the solver spreads
    the groups over the others (on a real cluster the latency model may keep a small model local)."""
    lines = ["name: test", "coordinator: dev0", "devices:"]
    for i in range(n):
        gflops = coordinator_gflops if i == 0 else 1.0 + 0.5 * (i % 2)
        dev_loss = loss if i >= n - lossy and i > 0 else 0.0
        mem = memory_mb if i == 0 or remote_memory_mb is None else remote_memory_mb
        lines.append(f"  - {{name: dev{i}, address: '127.0.0.1:{base_port + i}', memory_mb: {mem}, "
                     f"compute_gflops: {gflops}, latency_ms: {latency_ms}, loss: {dev_loss}}}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_vocab_dir(tiny_llama_dir):
    """A tiny random LLaMA with the suite's own byte-level BPE tokenizer.json (tests/tinytok.py,
    VOCAB_SIZE ids), so the whole compiler and runtime run on it without the real model."""
    from tinytok import VOCAB_SIZE, write_tiny_tokenizer

    path = tiny_llama_dir(seed=3, tie=True, vocab_size=VOCAB_SIZE, intermediate_size=96, num_hidden_layers=3)
    if not (path / "tokenizer.json").exists():
        write_tiny_tokenizer(path / "tokenizer.json", VOCAB_SIZE)
    return path


@pytest.fixture(scope="session")
def tiny_plan(tiny_vocab_dir, tmp_path_factory):
    """A compiled 4-device plan (one lossy device) of the tiny model: (plan, directory)."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    root = tmp_path_factory.mktemp("tiny-plan")
    profile = root / "cluster.yaml"
    # remote memory so tight that every device, the lossy one included, must hold some groups
    profile.write_text(cluster_yaml(4, lossy=1, remote_memory_mb=0.25))
    opts = CompileOptions(calib_tokens=1024, chunk_tokens=128, sample_tokens=512, mlp_groups=5,
                          relaxed_share=0.3, max_context=256, solver_time=2.0, progress=False)
    return compile_plan(str(tiny_vocab_dir), profile, root / "plan", opts)


def compile_tiny(model_dir, root, **memory):
    """(plan, directory) of the tiny model on a 4-device cluster_yaml(4, lossy=1, **memory)."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    profile = root / "cluster.yaml"
    profile.write_text(cluster_yaml(4, lossy=1, **memory))
    opts = CompileOptions(calib_tokens=1024, chunk_tokens=128, sample_tokens=512, mlp_groups=5,
                          relaxed_share=0.3, max_context=256, solver_time=2.0, progress=False)
    return compile_plan(str(model_dir), profile, root / "plan", opts)


@pytest.fixture(scope="session")
def roomy_plan(tiny_vocab_dir, tmp_path_factory):
    """(plan, directory): the tiny model on 4 devices, the remote ones roomy enough to adopt a dead
    device's groups (failover) and to hold every session slot."""
    return compile_tiny(tiny_vocab_dir, tmp_path_factory.mktemp("roomy-plan"), remote_memory_mb=64)


@pytest.fixture(scope="session")
def tiny_shards(tiny_plan) -> dict:
    """Every device's shard of the tiny plan, mapped (read only)."""
    from halo_runtime.core.shards import load_shard

    plan, directory = tiny_plan
    return {d: load_shard(directory, plan, d) for d in plan.device_names}


@pytest.fixture(scope="session")
def plan_dir(tiny_plan) -> Path:
    """The tiny plan's directory (shared: never modify it; take `plan_copy`)."""
    return Path(tiny_plan[1])


@pytest.fixture
def plan_copy(plan_dir, tmp_path) -> Path:
    """A private copy of the tiny plan's directory, for tests that damage files."""
    copy = tmp_path / "plan"
    shutil.copytree(plan_dir, copy)
    return copy
