"""Flag parsing shared by the event stream's commands: whole flags only, a bad one in one line.

Left to itself, argparse (under Django's CommandParser) takes any unambiguous prefix for the
whole flag: `outbox_poller --batch 0` would run as `--batch-size 0`, and `outbox_replay --al` would
replay every failed event. A typo must be refused, not guessed. And on an unknown flag or a
missing value argparse prints its whole usage block before the error, where the project's rule
(as for a bad value, see event_stream.settings) is one line naming the problem, exit status 2.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser


def one_line(text: str) -> str:
    """argparse repeats the arguments it refuses: a line break in one must not split the line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class OneLineErrorParser(CommandParser):
    """Django's CommandParser, printing a command-line error as one line, without the usage."""

    def error(self, message):
        if not self.called_from_command_line:
            super().error(message)  # raises CommandError, as callers of call_command expect
        # Status 2: argparse's own for a usage error, and the same as for a bad value.
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


class StrictFlagsCommand(BaseCommand):
    """A management command that takes its flags whole and reports a bad one in one line."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs) -> CommandParser:
        kwargs["allow_abbrev"] = False
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # Django builds a CommandParser and offers no hook for another class. OneLineErrorParser
        # only overrides error() and keeps no state of its own, so the built parser can take it.
        parser.__class__ = OneLineErrorParser
        return parser
