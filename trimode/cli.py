"""The `trimode` command line: one click group; each family of commands lives in its own module."""

from __future__ import annotations

import sys

import click

from . import __version__, cli_bench, cli_build, cli_checkpoint, cli_generate, cli_serve
from .cli_errors import USER_ERRORS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="trimode")
def cli() -> None:
    """trimode: build and serve Nemotron-Labs Diffusion models in AR, diffusion and self-speculation modes."""


# Each command module lists its click commands in COMMANDS.
for module in (cli_checkpoint, cli_generate, cli_build, cli_serve, cli_bench):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    """Entry point: user errors (bad checkpoint, bad request) print one line and exit with status 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
