"""The ``sparseinfer`` command: a click group with a few verbs.

Each domain keeps its commands in its own module (``sim_commands``, …) and registers
them here. Every error is one line on stderr (``error: …``) with exit code 2.
"""
from __future__ import annotations

import signal
import sys

import click

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import Terminated, os_error_message, terminate_as_interrupt

from . import stdio


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the command (its writers have removed their partial files on
    the way out)."""

    def __init__(self, terminated: bool = False):
        super().__init__()
        self.terminated = terminated


# click >= 8.2 raises this for the bare group (no command); older clicks print the help and exit 0
_NO_COMMAND = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(message: str) -> str:
    """A message on one line: click's run over several (a missing Choice option lists its
    choices one per line), each line's indent and break read as one space."""
    return " ".join(message.split())


class OneLineErrors(click.Group):
    """A click group whose usage errors (a bad or missing value, an unknown option or
    command, a number out of range: every command's, caught here once), SparseInferErrors
    and OS errors (disk full, not a directory, permission) print one line and exit 2; Ctrl-C
    prints one line and exits 130 (SIGTERM: 143); a pipe on stdout closed early ends it
    quietly with exit 141 (stdio). `sparseinfer` alone prints the help, as --help does."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:     # before click turns it into Abort with a blank line
            raise _Interrupted(isinstance(e, Terminated)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with terminate_as_interrupt():
                rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            sys.stdout.flush()             # a result still buffered fails here, not at exit
            return rv
        except stdio.ReaderGone:
            sys.exit(stdio.READER_GONE_EXIT)
        except (_Interrupted, KeyboardInterrupt) as e:
            if isinstance(e, Terminated) or getattr(e, "terminated", False):
                click.echo("error: terminated", err=True)
                sys.exit(128 + signal.SIGTERM)
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except _NO_COMMAND as e:
            click.echo(e.ctx.get_help())
            return 0
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(2)
        except (SparseInferError, FileNotFoundError) as e:
            click.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
            sys.exit(2)
        except OSError as e:
            click.echo(f"error: {os_error_message(e)}", err=True)
            sys.exit(2)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparseinfer")
def cli():
    """SparseInfer: training-free sign-bit prediction of activation sparsity.

    Start with `sparseinfer tour`, the main job. Each command has --help.
    """


def _register():
    from . import (decode_commands, dse_commands, eval_commands, export_commands, kernel_commands, latency_commands,
                   method_commands, sim_commands, tour_commands)

    for module in (sim_commands, latency_commands, kernel_commands, export_commands, decode_commands, dse_commands,
                   tour_commands, eval_commands, method_commands):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main():
    stdio.install()
    cli()


if __name__ == "__main__":
    main()
