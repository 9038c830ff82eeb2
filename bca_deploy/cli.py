"""The ``bca-deploy`` command line: a thin click layer over the library.

Heavy imports (torch, transformers, onnxruntime) happen inside commands so ``--help`` is instant.
Library errors (:class:`bca_deploy.errors.BCAError`) are shown as one clean message, exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

_PATH = click.Path(path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


class _Group(click.Group):
    """Turns bca-deploy's own errors into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from .errors import BCAError

        try:
            return super().invoke(ctx)
        except BCAError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bca-deploy")
def main() -> None:
    """Block-circulant adapters from training to production: inspect, convert, merge, export."""


@main.command()
@click.argument("adapter", type=_EXISTING_DIR)
def inspect(adapter: Path) -> None:
    """Print what an adapter directory (bca-deploy or PEFT C3A) holds."""
    from .adapter_io import read_adapter

    config, state = read_adapter(adapter)
    click.echo(f"adapter:      {adapter}")
    click.echo(f"base model:   {config.base_model_type or 'unknown'} ({config.base_model_name_or_path or 'no path recorded'})")
    click.echo(f"targets:      {config.target_modules}")
    click.echo(f"modules:      {len(config.modules)}   kernel parameters: {config.num_parameters:,}")
    if config.modules_to_save:
        n = sum(t.numel() for k, t in state.items() if not k.endswith(".bca_kernel"))
        click.echo(f"saved whole:  {', '.join(config.modules_to_save)} ({n:,} parameters)")
    width = max(len(n) for n in config.modules)
    click.echo(f"\n{'module':<{width}}  {'type':<6}  {'in':>6}  {'out':>6}  {'p':>4}  scaling")
    for name, spec in sorted(config.modules.items()):
        click.echo(f"{name:<{width}}  {spec.layer_type:<6}  {spec.in_features:>6}  {spec.out_features:>6}  "
                   f"{spec.block_size:>4}  {spec.scaling:.6g}")


@main.command()
@click.option("--adapter", "source", type=_EXISTING_DIR, required=True, help="Adapter directory to convert.")
@click.option("--to", type=click.Choice(["bca", "peft"]), required=True,
              help="Target format: bca-deploy or PEFT C3A (loadable by PeftModel.from_pretrained).")
@click.option("--out", type=_PATH, required=True, help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter already in --out.")
def convert(source: Path, to: str, out: Path, overwrite: bool) -> None:
    """Convert an adapter between the bca-deploy and PEFT C3A formats (exact)."""
    from .adapter_io import convert_adapter

    path = convert_adapter(source, out, to=to, overwrite=overwrite)
    click.echo(f"wrote {to} adapter to {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
