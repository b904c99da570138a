"""`halo-compile`: plan, inspect and verify deployable HALO plans.

Example:
    $ halo-compile plan smollm2-135m --cluster profiles/pi5.yaml
    $ halo-compile inspect artifacts/smollm2-135m-pi5
    $ halo-compile verify artifacts/smollm2-135m-pi5 --model smollm2-135m
"""
from __future__ import annotations

import sys
from functools import wraps

import click

from . import __version__

# User mistakes become one line and exit code 2; anything else is a bug and keeps its traceback.
EXIT_USER_ERROR = 2


def _user_errors():
    from halo_runtime.plan import PlanError

    from .calib import CalibError
    from .cluster import ProfileError
    from .load import ModelError
    from .place import InfeasibleError

    return (PlanError, ProfileError, ModelError, CalibError, InfeasibleError, OSError)


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
               f"(plan.json, manifest.json, tokenizer.json, {len(compiled.devices)} shards)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@friendly
def inspect(directory):
    """Per-device table of a compiled plan, and its expected loss vs a loss-blind placement."""
    from halo_runtime.plan import load_plan

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


if __name__ == "__main__":
    main()
