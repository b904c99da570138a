"""`halo-compile verify`: the files are the ones the manifest names, and the shards together hold
exactly the model's weights, every row and column once.

Example (the checked-in plan.json, edited after compiling: the manifest catches it first):
    >>> import shutil, tempfile
    >>> from pathlib import Path
    >>> from halo_compile.verify import verify_plan
    >>> tmp = tempfile.TemporaryDirectory()                  # removed when the example ends
    >>> copy = Path(tmp.name)
    >>> for name in ("plan.json", "manifest.json"):
    ...     _ = shutil.copy(Path("artifacts/smollm2-135m-pi5") / name, copy)
    >>> text = (copy / "plan.json").read_text()
    >>> _ = (copy / "plan.json").write_text(text.replace('"seed": 0', '"seed": 1'))
    >>> verify_plan(copy)
    Traceback (most recent call last):
    ...
    halo_runtime.core.plandir.PlanError: .../plan.json: SHA-256 does not match manifest.json (...)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from halo_runtime.core.plan import PlanError, load_plan
from halo_runtime.core.plandir import check_files, read_manifest
from halo_runtime.core.shards import load_shard

from .load import fingerprint, load_model
from .slicing import assemble, assemble_stored, stored_fingerprint, stored_model


def check_manifest(directory: Path) -> int:
    """Check every file the manifest lists (the runtime's own check); return how many."""
    files = read_manifest(directory)
    check_files(directory, sorted(files))
    return len(files)


def verify_plan(directory: str | Path, model_spec: str | None = None) -> list[str]:
    """Raise PlanError on the first problem; return what was checked."""
    directory = Path(directory)
    n = check_manifest(directory)
    plan = load_plan(directory)
    shards = {dev: load_shard(directory, plan, dev) for dev in plan.device_names}
    done = [f"manifest: {n} files match their SHA-256"]
    if plan.weights != "fp32":
        return done + _verify_quantised(directory, plan, shards, model_spec)
    full = assemble(plan, shards)
    fp = fingerprint(full)
    if fp != plan.model_fingerprint:
        raise PlanError(f"{directory}: shards reassemble to fingerprint {fp[:12]}, plan says "
                        f"{plan.model_fingerprint[:12]}")
    done.append(f"shards: {len(full)} tensors reassemble to the plan's model (fingerprint {fp[:12]})")
    if model_spec:
        model = load_model(model_spec, progress=False)
        missing = sorted(set(model.weights) - set(full))
        extra = sorted(set(full) - set(model.weights))
        if missing or extra:
            raise PlanError(f"{directory}: shards lack {missing[:1]} or hold extra {extra[:1]} vs {model_spec}")
        for name, t in model.weights.items():
            if not torch.equal(t.float(), full[name].float()):
                raise PlanError(f"{directory}: {name} differs from {model_spec}")
        done.append(f"model: every weight of {model_spec} is held exactly once, bit for bit")
    return done


def _verify_quantised(directory: Path, plan, shards: dict, model_spec: str | None) -> list[str]:
    """The shards reassemble exactly to the plan's quantised model (its weights fingerprint), and,
    given the model, that model quantised by the plan's groups is the same, bit for bit."""
    qmodel, norms = assemble_stored(plan, shards)
    fp = stored_fingerprint(qmodel, plan.weights)
    if fp != plan.weights_fingerprint:
        raise PlanError(f"{directory}: shards reassemble to {plan.weights} weights fingerprint {fp[:12]}, plan says "
                        f"{plan.weights_fingerprint[:12]} (a value or scale tensor differs from what was compiled)")
    done = [f"shards: {len(qmodel)} {plan.weights} weights reassemble to the plan's quantised model "
            f"(fingerprint {fp[:12]}), {len(norms)} fp32 norms"]
    if model_spec:
        model = load_model(model_spec, progress=False)
        if model.fingerprint != plan.model_fingerprint:
            raise PlanError(f"{directory}: {model_spec} has fingerprint {model.fingerprint[:12]}, plan says "
                            f"{plan.model_fingerprint[:12]}")
        if stored_fingerprint(stored_model(plan, model.weights), plan.weights) != fp:
            raise PlanError(f"{directory}: {model_spec} quantised to {plan.weights} by the plan's groups differs "
                            f"from the shards")
        for name, t in norms.items():
            if not torch.equal(torch.from_numpy(np.array(t, dtype=np.float32)), model.weights[name].float()):
                raise PlanError(f"{directory}: {name} differs from {model_spec}")
        done.append(f"model: {model_spec} quantised to {plan.weights} by the plan's groups is what the shards "
                    f"hold, bit for bit")
    return done
