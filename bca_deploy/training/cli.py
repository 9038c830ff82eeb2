"""The ``train`` and ``evaluate`` commands, generated from :class:`TrainConfig` / :class:`EvaluateConfig`.

``bca-deploy train`` and ``python -m bca_deploy.training train`` (what ``torchrun`` launches) are the same
click command object, so they have the same options, help, checks and output. Each option is a dataclass
field: its flag, help, type and choices come from the field's metadata (:mod:`bca_deploy.training.config`).
Nothing here imports torch until a command runs.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable

import click

from .config import EvaluateConfig, TrainConfig, option_flag

__all__ = ["train_command", "evaluate_command", "config_options", "parse_list"]


def parse_list(value: str | None) -> list[str] | None:
    """A list option's items: ``a,b,c`` (each stripped), or a JSON array of strings for items that hold a comma
    (``'["0-5, low", "5-10, high"]'``). An empty item is refused (``negative,,positive`` would number the classes
    after it one lower); a single trailing comma is allowed.

    Raises:
        click.BadParameter: an empty item, or a JSON array that is malformed or holds anything but strings.
    """
    if value is None:
        return None
    if value.lstrip().startswith("["):
        import json

        try:
            items = json.loads(value)
        except ValueError as exc:
            raise click.BadParameter(f"a value starting with '[' is read as a JSON array of strings, and this is "
                                     f"not one ({exc}): {value[:200]!r}; a name starting with '[' goes in that form, "
                                     "e.g. '[\"[neg]\", \"[pos]\"]'") from None
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise click.BadParameter(f"expected a JSON array of strings, got {value[:200]!r}")
        items = [v.strip() for v in items]
    else:
        items = [v.strip() for v in value.split(",")]
        if len(items) > 1 and not items[-1]:
            items.pop()
    if not items or not all(items):
        raise click.BadParameter(f"expected ITEM[,ITEM...] (or a JSON array of strings) with no empty item, got "
                                 f"{value[:200]!r}")
    return items


def _pattern(value: str | None) -> dict[str, int] | None:
    if value is None:
        return None
    out = {}
    for item in parse_list(value) or []:
        name, sep, p = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            size = int(p)
        except ValueError:
            raise click.BadParameter(f"expected NAME=P[,NAME=P...], got {item!r}") from None
        if name.strip() in out:  # which one would win is not what the user meant either way
            raise click.BadParameter(f"{name.strip()!r} is given twice ({out[name.strip()]} and {size})")
        out[name.strip()] = size
    return out


def _scale(value: str | None) -> float | str | None:
    if value is None or value.strip() == "p":
        return None if value is None else "p"
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'p' (each module's block size), got {value!r}") from None


def _option(f) -> tuple[Callable[[Callable], Callable], Callable[[Any], Any]]:
    """A click option decorator for dataclass field ``f`` and the converter from click's value to the field's."""
    meta = f.metadata
    kind, flag, help_text = meta["kind"], option_flag(f.name), meta["help"]
    default = None if f.default is MISSING else f.default
    convert: Callable[[Any], Any] = lambda v: v  # noqa: E731
    if kind == "flag":
        if default is True:  # an on-by-default switch: the flag turns it off
            decorator = click.option(f"--no-{f.name.replace('_', '-')}", f.name, is_flag=True, flag_value=False,
                                     default=True,
                                     help=f"Turn off (on by default): {help_text[0].lower()}{help_text[1:]}")
        else:
            decorator = click.option(flag, f.name, is_flag=True, default=False, help=help_text)
    elif kind == "tristate":
        decorator = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
    else:
        types = {"path": click.Path(path_type=Path), "int": int, "float": float, "str": str, "list": str,
                 "pattern": str, "scale": str, "choice": click.Choice(meta["choices"]) if meta["choices"] else str}
        shown = default is not None and kind in ("int", "float", "str", "choice")
        decorator = click.option(flag, f.name, type=types[kind], default=default, show_default=shown,
                                 help=help_text, required=False)
        if kind == "list":
            convert = parse_list
        elif kind == "pattern":
            convert = _pattern
        elif kind == "scale":
            convert = _scale
    return decorator, convert


def config_options(cls: type) -> tuple[Callable[[Callable], Callable], Callable[[dict[str, Any]], Any]]:
    """Decorate a click command with one option per field of dataclass ``cls``; build ``cls`` from its kwargs.

    Required fields are checked by the config's own validation (with every other problem at once), not by
    click, so a command with three mistakes reports all three.
    """
    specs = [(f, *_option(f)) for f in fields(cls) if not f.metadata.get("library_only")]

    def decorate(fn: Callable) -> Callable:
        for _, decorator, _ in reversed(specs):
            fn = decorator(fn)
        return fn

    def build(kwargs: dict[str, Any]) -> Any:
        values = {}
        for f, _, convert in specs:
            try:
                values[f.name] = convert(kwargs[f.name])
            except click.BadParameter as exc:  # converted after click's parsing: name the option here
                exc.param_hint = f"'--{f.name.replace('_', '-')}'"
                raise
        return cls(**values)

    return decorate, build


_train_options, _build_train = config_options(TrainConfig)
_evaluate_options, _build_evaluate = config_options(EvaluateConfig)


@click.command("train", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_train_options
def train_command(**kwargs: Any) -> None:
    """Fine-tune a model with a block-circulant adapter (CUDA when present; DDP under torchrun).

    \b
    bca-deploy train --model MODEL_DIR --data train.tsv --eval-data heldout.tsv --out runs/sst2
    torchrun --nproc_per_node 2 -m bca_deploy.training train ...   (same options)

    Optimisation options left unset come from --recipe (default: AdamW, chosen by measurement; paper: the
    BCA paper's Adadelta recipe). The adapter records its task, head and labels, so merge, export and
    serve need no --task.
    """
    config: TrainConfig = _build_train(kwargs)
    config.validate()  # before torch is imported: a typo is reported at once
    from .errors import TrainingTerminated
    from .report import final_summary
    from .trainer import train

    try:
        result = train(config)
    except TrainingTerminated as exc:  # the trainer has said what is left in --out; exit as the signal's program
        sys.exit(128 + exc.signal_number)
    if _rank() == 0:
        click.echo(final_summary(result, config.model, config.eval_data))


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_evaluate_options
def evaluate_command(**kwargs: Any) -> None:
    """Print the task metrics of a base model + adapter on a labelled data file.

    Options left unset are those the adapter was trained with (recorded beside it), so the numbers equal
    what train logged for that checkpoint.
    """
    config: EvaluateConfig = _build_evaluate(kwargs)
    config.validate()
    from .report import format_metrics
    from .trainer import evaluate

    metrics = evaluate(config)
    if _rank() == 0:
        click.echo(format_metrics(metrics))


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def module_main(argv: list[str] | None = None) -> None:
    """``python -m bca_deploy.training``: the same commands as ``bca-deploy train`` / ``evaluate``."""
    from ..cli import _Group

    group = _Group(name="python -m bca_deploy.training", commands=[train_command, evaluate_command],
                   context_settings={"help_option_names": ["-h", "--help"]},
                   help="Training commands for torchrun (the same as bca-deploy train / evaluate).")
    group.main(args=argv if argv is not None else sys.argv[1:], prog_name="python -m bca_deploy.training")
