"""`halo-compile`: plan, inspect and verify deployable HALO plans.

Example:
    $ halo-compile plan smollm2-135m --cluster profiles/pi5.yaml
    $ halo-compile inspect artifacts/smollm2-135m-pi5
    $ halo-compile verify artifacts/smollm2-135m-pi5 --model smollm2-135m
    $ halo-compile eval artifacts/smollm2-135m-pi5 --plr 0.05 --plr 0.1 --tokens 8192 --json
"""
from __future__ import annotations

import sys
from functools import wraps

import click

from . import __version__

# User mistakes become one line and exit code 2; anything else is a bug and keeps its traceback.
EXIT_USER_ERROR = 2


def _user_errors():
    from halo_runtime.core.plan import PlanError
    from halo_runtime.core.plandir import KeyFileError

    from .calib import CalibError
    from .cluster import ProfileError
    from .load import ModelError
    from .place import InfeasibleError

    return (PlanError, ProfileError, ModelError, CalibError, InfeasibleError, KeyFileError, OSError)


def friendly(fn):
    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            click.echo(f"halo-compile: error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("halo-compile: interrupted; nothing was written", err=True)
            sys.exit(130)
    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="halo-compile")
def main():
    """HALO offline planning compiler for LLaMA models on lossy edge clusters."""


@main.command()
@click.argument("model")
@click.option("--cluster", "cluster", required=True, type=click.Path(dir_okay=False),
              help="Cluster profile YAML (see profiles/).")
@click.option("-o", "--out", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: artifacts/<model>-<profile>].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration text file [default: first half of the built-in Wikipedia articles].")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="Calibration tokens to profile.")
@click.option("--groups", "mlp_groups", type=int, default=16, show_default=True, help="MLP neuron groups per layer.")
@click.option("--relaxed-share", type=float, default=0.15, show_default=True,
              help="Importance share of each layer's MLP groups that may be relaxed.")
@click.option("--max-context", type=int, default=2048, show_default=True, help="KV cache length to budget for.")
@click.option("--solver-time", type=float, default=10.0, show_default=True,
              help="CP-SAT deterministic time budget per phase.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly
def plan(model, cluster, out, seed, calib, calib_tokens, mlp_groups, relaxed_share, max_context, solver_time, quiet):
    """Compile MODEL (HF directory, .gguf file or built-in `smollm2-135m`) for a cluster."""
    import time

    from .pipeline import CompileOptions, compile_plan
    from .report import inspect_text

    try:
        opts = CompileOptions(seed=seed, calib_file=calib, calib_tokens=calib_tokens, mlp_groups=mlp_groups,
                              relaxed_share=relaxed_share, max_context=max_context, solver_time=solver_time,
                              progress=not quiet)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    started = time.perf_counter()
    compiled, path = compile_plan(model, cluster, out, opts)
    click.echo(inspect_text(compiled))
    click.echo(f"\nwrote {path}/ in {time.perf_counter() - started:.1f} s "
               f"(plan.json, manifest.json, tokenizer.json, tokenizer_config.json, {len(compiled.devices)} shards)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@friendly
def inspect(directory):
    """Per-device table of a compiled plan, and its expected loss vs a loss-blind placement."""
    from halo_runtime.core.plan import load_plan

    from .report import inspect_text

    click.echo(inspect_text(load_plan(directory)))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Also compare every weight with this model, bit for bit.")
@friendly
def verify(directory, model):
    """Check hashes, and that the shards hold exactly the model's weights."""
    from .verify import verify_plan

    for line in verify_plan(directory, model):
        click.echo(f"ok  {line}")


@main.command("eval")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--plr", "plrs", type=float, multiple=True,
              help="Loss rate on the plan's lossy links; repeat for several [default: the profile's rates].")
@click.option("--tokens", type=int, default=8192, show_default=True, help="Evaluation tokens.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="UTF-8 text to score [default: evaluation half of the built-in Wikipedia articles].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulated loss.")
@click.option("--method", "methods", multiple=True,
              help="Only these methods (repeatable; the default method always runs, first): "
                   "predictor+lowrank, predictor, lowrank, mean, zero, loss-blind.")
@click.option("--context", type=int, default=512, show_default=True, help="Window length (non-overlapping).")
@click.option("--relaxed-retries", type=int, default=1, show_default=True,
              help="Delivery policy simulated: fast re-requests of a late relaxed part.")
@click.option("--redundancy", type=int, default=1, show_default=True,
              help="Delivery policy simulated: copies of each message on lossy links.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--predictive", multiple=True, metavar="DEVICE",
              help="Run DEVICE in predictive loading mode (skip MLP groups predicted inactive); repeatable.")
@friendly
def evaluate(directory, plrs, tokens, text_file, seed, methods, context, relaxed_retries, redundancy, as_json, quiet,
             predictive):
    """Perplexity of the full model and of the plan in DIRECTORY under simulated loss, per method."""
    import json

    import torch
    from halo_runtime.core.policy import DeliveryPolicy

    from .evaluate import EvalOptions, format_table
    from .evaluate import evaluate as run_eval

    torch.set_num_threads(1)  # the machines this runs on are small and shared
    try:
        opts = EvalOptions(plrs=tuple(plrs) or None, tokens=tokens, context=context, text_file=text_file, seed=seed,
                           methods=tuple(methods) or None, progress=not quiet, predictive=tuple(predictive),
                           policy=DeliveryPolicy(relaxed_retries=relaxed_retries, redundancy=redundancy))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    report = run_eval(directory, opts)
    click.echo(json.dumps(report) if as_json else format_table(report))


if __name__ == "__main__":
    main()
