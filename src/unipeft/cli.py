"""The `unipeft` command line (typer). Bad input prints one line on stderr and exits 2, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UnipeftError

try:  # typer vendors its own click (0.2x); older typers use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="unipeft: parameter-efficient fine-tuning, every method a preset of one engine.")
console = Console(markup=False, highlight=False)  # (paths and user text print as given: "runs/a[1]" is no markup)


def _knobs(part) -> str:
    d = part.to_dict()
    d.pop("function"), d.pop("composition")
    return ", ".join(f"{k}={v}" for k, v in d.items())


@app.command()
def presets(
    name: Annotated[str | None, typer.Argument(help="Show one preset's full recipe as YAML.")] = None,
) -> None:
    """List the built-in presets with their knobs (defaults follow the papers)."""
    from .presets import list_presets, load_preset

    if name is not None:
        print(load_preset(name).to_yaml(), end="")
        return
    table = Table(title="unipeft presets", show_lines=True)
    for col in ("preset", "part", "function", "composition"):
        table.add_column(col, no_wrap=True)
    table.add_column("knobs", overflow="fold")
    table.add_column("mergeable", no_wrap=True)
    for n in list_presets():
        recipe = load_preset(n)
        for i, part in enumerate(recipe.parts):
            table.add_row(n if i == 0 else "", part.name, part.function, part.composition, _knobs(part),
                          ("yes" if recipe.mergeable else "no") if i == 0 else "")
    console.print(table)
    for n in list_presets():
        recipe = load_preset(n)
        console.print(f"[bold]{escape(n)}[/]: {escape(recipe.description)} ({escape(', '.join(recipe.references))})",
                      markup=True)
    console.print("Show one recipe in full: unipeft presets NAME. A new method is a YAML file with the same knobs.")


@app.command()
def sites(
    model_path: Annotated[str, typer.Argument(help="A transformers model folder, or minilm, smollm2.")],
) -> None:
    """List the sites a model offers (from its family's interface map) and where they live."""
    from .arch import family_of, find_layers, site_table
    from .assets import load_model

    model = load_model(model_path)
    fmap = family_of(model)
    if fmap is None:
        console.print(f"{type(model).__name__} has no interface map: target its linear modules by name "
                      "(targets=[...], see docs/recipes.md for the matching rule).")
        return
    _, layers = find_layers(model, fmap)
    table = Table(title=f"{type(model).__name__} ({fmap.family} map, {len(layers)} layers)")
    for col in ("site", "representation", "module (N = layer index)"):
        table.add_column(col, overflow="fold")
    for row in site_table(model):
        table.add_row(*row)
    console.print(table)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="A peft adapter folder, a unipeft adapter folder or a run folder.")],
    dst: Annotated[str, typer.Argument(help="The folder to write (new or empty).")],
    to: Annotated[str | None, typer.Option("--to", help="peft or unipeft; detected from SRC when omitted.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="The base model (folder, minilm or smollm2); default: the one SRC names.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="peft → unipeft: the adapter's name (default: default); unipeft → peft: which one.")] = None,
) -> None:
    """Convert adapters between peft's format and unipeft's (direction from SRC; outputs are checked equal in tests)."""
    from .convert import convert as run_convert

    written, out = run_convert(src, dst, to=to, model=model, name=name)
    print(f"wrote a {written} adapter folder: {out}")


from . import cli_run  # noqa: E402,F401  (registers train/eval/predict/generate/merge/compare)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        code = app(standalone_mode=False)  # (click's usage errors come back here, to be printed as one line)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click_errors.NoArgsIsHelpError as e:  # bare `unipeft` / `unipeft CMD`: the help, as typer prints it
        text = e.ctx.get_help() if e.ctx is not None else e.format_message()
        if text:  # (typer's rich help prints itself and returns nothing)
            print(text)
        sys.exit(0 if e.ctx is not None and e.ctx.parent is None else 2)
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "unipeft"
        print(f"error: {e.format_message()} (see `{where} --help`)", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # (click turns Ctrl-C into Abort when it does not exit itself)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UnipeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a model folder transformers cannot read
        print(f"error: {e.strerror or e}{f': {e.filename}' if getattr(e, 'filename', None) else ''}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover - `python -m unipeft.cli`: use the package module (all commands)
    from unipeft.cli import main as package_main

    package_main()
