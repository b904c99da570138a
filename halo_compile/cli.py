"""`halo-compile`: plan, inspect and verify deployable HALO plans.

    $ halo-compile plan smollm2-135m --cluster profiles/pi5.yaml
    $ halo-compile inspect artifacts/smollm2-135m-pi5
    $ halo-compile verify artifacts/smollm2-135m-pi5 --model smollm2-135m
    $ halo-compile eval artifacts/smollm2-135m-pi5 --plr 0.05 --plr 0.1 --tokens 8192 --json
    $ halo-compile profile merge probe-*.yaml --base profiles/pi5.yaml -o profiles/pi5-measured.yaml

An option that sets a field of an options dataclass (CompileOptions, EvalOptions, DeliveryPolicy)
takes its default, and its help unless it has its own, from that field: the defaults are typed once.

Example:
    >>> from halo_compile.cli import field_default, field_doc
    >>> from halo_compile.pipeline import CompileOptions
    >>> field_default(CompileOptions, "calib_tokens"), field_doc(CompileOptions, "mlp_groups")
    (8192, 'MLP neuron groups per layer.')
    >>> from click.testing import CliRunner
    >>> from halo_compile.cli import main
    >>> out = CliRunner().invoke(main, ["plan", "--help"], max_content_width=200).output
    >>> next(line.split(None, 2)[2] for line in out.splitlines() if "--calib-tokens" in line)
    'Calibration tokens profiled.  [default: 8192]'
"""
from __future__ import annotations

import importlib
import sys
from functools import wraps

import click
from halo_runtime.core.formats import FORMATS, REPLACED
from halo_runtime.core.options import field_default, field_docs
from halo_runtime.core.plan import ROUNDS

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


def field_doc(cls, name: str) -> str:
    """The docstring under dataclass `cls`'s field `name`, on one line ("" if it has none)."""
    return field_docs(cls).get(name, "")


class FieldOption(click.Option):
    """An option whose default, and help unless given, are a field of the options dataclass `of`
    ("module:Class"; field: the option's name unless given). The class is imported only when click
    needs the default (running the command, or its --help): the compiler's modules load torch, which
    `halo-compile inspect` need not wait for."""

    def __init__(self, *decls, of: str, field: str | None = None, **kwargs):
        super().__init__(*decls, show_default=True, **kwargs)
        self.of, self.field = of, field or self.name

    def options_class(self):
        module, _, name = self.of.partition(":")
        return getattr(importlib.import_module(module), name)

    def get_default(self, ctx, call: bool = True):
        return field_default(self.options_class(), self.field)

    def get_help_record(self, ctx):
        if self.help is None:
            self.help = field_doc(self.options_class(), self.field)
        return super().get_help_record(ctx)


def field_option(*decls, of: str, **kwargs):
    """`click.option` for a `FieldOption`."""
    return click.option(*decls, cls=FieldOption, of=of, **kwargs)


COMPILE = "halo_compile.pipeline:CompileOptions"
EVAL = "halo_compile.evaluate:EvalOptions"
POLICY = "halo_runtime.core.policy:DeliveryPolicy"


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
@field_option("--seed", of=COMPILE, type=int)
@field_option("--calib", of=COMPILE, field="calib_file", type=click.Path(dir_okay=False),
              help="Calibration text file [default: first half of the built-in Wikipedia articles].")
@field_option("--calib-tokens", of=COMPILE, type=int)
@field_option("--groups", "mlp_groups", of=COMPILE, type=int)
@field_option("--relaxed-share", of=COMPILE, type=float)
@field_option("--max-context", of=COMPILE, type=int)
@field_option("--solver-time", of=COMPILE, type=float)
@field_option("--weights", of=COMPILE, type=click.Choice([*FORMATS, *REPLACED]))
@field_option("--failover/--no-failover", of=COMPILE, field="failover")
@field_option("--rounds", "plan_rounds", of=COMPILE, field="rounds", type=click.Choice(["auto", *ROUNDS]))
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly
def plan(model, cluster, out, seed, calib, calib_tokens, mlp_groups, relaxed_share, max_context, solver_time,
         weights, failover, plan_rounds, quiet):
    """Compile MODEL (HF directory, .gguf file or built-in `smollm2-135m`) for a cluster."""
    import time

    from .pipeline import CompileOptions, compile_plan
    from .report import inspect_text

    try:
        opts = CompileOptions(seed=seed, calib_file=calib, calib_tokens=calib_tokens, mlp_groups=mlp_groups,
                              relaxed_share=relaxed_share, max_context=max_context, solver_time=solver_time,
                              weights=weights, failover=failover, rounds=plan_rounds, progress=not quiet)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    started = time.perf_counter()
    compiled, path = compile_plan(model, cluster, out, opts)
    click.echo(inspect_text(compiled, _view_bytes(path)))
    click.echo(f"\nwrote {path}/ in {time.perf_counter() - started:.1f} s "
               f"(plan.json, manifest.json, tokenizer.json, tokenizer_config.json, {len(compiled.devices)} shards)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@friendly
def inspect(directory):
    """Per-device table of a compiled plan, and its expected loss vs a loss-blind placement."""
    from halo_runtime.core.plan import load_plan

    from .report import inspect_text

    click.echo(inspect_text(load_plan(directory), _view_bytes(directory)))


def _view_bytes(directory) -> int | None:
    """The size of a plan directory's push view as its manifest records it (None: no view file)."""
    from halo_runtime.core.plandir import VIEW_FILE, read_manifest

    return read_manifest(directory).get(VIEW_FILE, {}).get("bytes")


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
@field_option("--burst", of=EVAL, type=float,
              help="Also run each loss rate with losses in bursts of this mean length (datagrams) on the "
                   "lossy links, next to independent losses [default: the profile's own bursts].")
@field_option("--tokens", of=EVAL, type=int)
@field_option("--text", "text_file", of=EVAL, type=click.Path(dir_okay=False),
              help="UTF-8 text to score [default: evaluation half of the built-in Wikipedia articles].")
@field_option("--seed", of=EVAL, type=int)
@click.option("--method", "methods", multiple=True,
              help="Only these methods (repeatable; the default method always runs, first): "
                   "predictor+lowrank, predictor, lowrank, mean, zero, loss-blind.")
@field_option("--context", of=EVAL, type=int)
@field_option("--greedy-prompts", of=EVAL, type=int)
@field_option("--greedy-tokens", of=EVAL, type=int)
@field_option("--rounds", of=EVAL, type=click.Choice(["plan", *ROUNDS]))
@field_option("--wire", of=EVAL, type=click.Choice(["fp32", "fp16"]))
@field_option("--relaxed-retries", of=POLICY, type=int,
              help="Delivery policy simulated: fast re-requests of a late relaxed part before its deadline.")
@field_option("--redundancy", of=POLICY, type=int,
              help="Delivery policy simulated: copies of every message to and from a lossy device (1 = none) [default: as many as the plan chose per link].")
@field_option("--multi-datagram-copies", of=POLICY, type=int,
              help="Delivery policy simulated: at least this many copies of a message of several datagrams.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--predictive", multiple=True, metavar="DEVICE",
              help="Run DEVICE in predictive loading mode (skip MLP groups predicted inactive); repeatable.")
@friendly
def evaluate(directory, plrs, burst, tokens, text_file, seed, methods, context, greedy_prompts, greedy_tokens, rounds,
             wire, relaxed_retries, redundancy, multi_datagram_copies, as_json, quiet, predictive):
    """Perplexity, top-1 agreement and greedy agreement of the plan in DIRECTORY under simulated loss,
    per method, against the plan with nothing lost."""
    import json

    import torch
    from halo_runtime.core.policy import DeliveryPolicy

    from .evaluate import EvalOptions, format_table
    from .evaluate import evaluate as run_eval

    torch.set_num_threads(1)  # the machines this runs on are small and shared
    try:
        opts = EvalOptions(plrs=tuple(plrs) or None, burst=burst, tokens=tokens, context=context, text_file=text_file, seed=seed,
                           greedy_prompts=greedy_prompts, greedy_tokens=greedy_tokens, rounds=rounds, wire=wire,
                           methods=tuple(methods) or None, progress=not quiet, predictive=tuple(predictive),
                           policy=DeliveryPolicy(relaxed_retries=relaxed_retries, redundancy=redundancy,
                                                 multi_datagram_copies=multi_datagram_copies))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    report = run_eval(directory, opts)
    click.echo(json.dumps(report) if as_json else format_table(report))


@main.group()
def profile():
    """Cluster profiles: merge what `halo-run probe` measured on each board into one."""


@profile.command("merge")
@click.argument("entries", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--base", type=click.Path(dir_okay=False), default=None,
              help="Hand-written profile to update: its devices of the same names take the measured values; "
                   "its comments, names, coordinator and defaults stay.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Merged profile to write (atomically, only once it is a valid profile).")
@click.option("--name", default=None, help="Profile name [default: the base's, else measured].")
@click.option("--coordinator", default=None,
              help="Coordinator device [default: the base's, else the first entry's device].")
@friendly
def merge(entries, base, out, name, coordinator):
    """Merge the profile ENTRIES that `halo-run probe` printed on each board into one cluster profile."""
    from .profilemerge import merge_files

    merge_files(entries, out, base, name, coordinator)
    merged = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}" + (f" into {base}" if base else "")
    click.echo(f"wrote {out} ({merged}); check it, then: halo-compile plan MODEL --cluster {out}")


if __name__ == "__main__":
    main()
