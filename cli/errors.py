"""The one error type of the command line: a clear message and exit status 2."""

import click


class CommandError(click.ClickException):
    """Bad input or a refused action: click prints 'Error: MESSAGE' and exits with 2."""

    exit_code = 2
