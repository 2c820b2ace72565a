"""What the `meshd` and `coordinator` command lines share (DESIGN.md §2, STYLE.md §5).

One convention for both:

- an expected failure is one line on stderr, ``error: <what happened>; <what to do>``, and exit
  status 1 (2 for a usage error, as click has it); never a traceback;
- the root callback stores the global options on ``ctx.obj`` as a typed dataclass, and commands take
  ``ctx: typer.Context`` and read it with :func:`options`.

Only typer's public API is used (typer vendors click; its exception classes are not exported, so usage
errors are recognised as :class:`typer.TyperException` with click's documented attributes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn, TypeVar

import typer

T = TypeVar("T")

USAGE = 2  #: exit status of a usage error (bad flag, missing argument), as click has it
ABORTED = 130  #: exit status after ^C, as a shell has it


def fail(message: str, code: int = 1) -> NoReturn:
    """Stop the command with ``error: <message>`` on stderr and a non-zero exit status.

    Printed here and not by :func:`run`, so that an app invoked directly (typer's ``CliRunner``)
    shows the same line.
    """
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def options(ctx: typer.Context, kind: type[T]) -> T:
    """The global options the root callback stored on ``ctx.obj`` (found from any subcommand)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, kind):
        raise TypeError(
            f"ctx.obj is {type(obj).__name__}, not {kind.__name__}: the root callback did not run"
        )
    return obj


def run(
    app: typer.Typer, argv: Sequence[str] | None = None, *, expected: tuple[type[Exception], ...] = ()
) -> NoReturn:
    """Entry point: run `app` and exit; every expected failure becomes one ``error:`` line.

    `expected` are the project's own exception types whose message is fit for a user (raised by code
    the commands call); their ``str()`` is printed. An ``OSError`` that reaches here is reported the
    same way: it is the environment's failure (permissions, a missing file), not a bug.
    """
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except expected as exc:
        _exit(str(exc), 1)
    except typer.TyperException as exc:  # click's ClickException family (typer vendors click)
        # A group run without a subcommand has already printed its help (typer itself recognises this
        # error by name, cf. typer#1278: the class is not exported).
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(USAGE)
        command_path = getattr(getattr(exc, "ctx", None), "command_path", None)
        hint = f"; see `{command_path} --help`" if command_path else ""
        _exit(f"{exc.format_message().rstrip('.')}{hint}", exc.exit_code)
    except typer.Abort:
        _exit("aborted", ABORTED)
    except typer.Exit as exc:  # raised outside a command (in non-standalone mode click returns it)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)  # the reader went away (`| head`): nobody is left to tell
    except KeyboardInterrupt:
        sys.exit(ABORTED)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _exit(f"{exc.strerror or exc}{where}", 1)
    # without standalone mode, a command's typer.Exit(code) comes back as the return value
    sys.exit(result if isinstance(result, int) else 0)


def _exit(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)
