"""The `wan2diffusers` command: a click group; each subcommand lives in converter/commands/."""

from __future__ import annotations

import click

from .version import __version__
from .commands.convert import convert
from .commands.inspect import inspect_cmd
from .commands.merge import merge
from .commands.publish import publish
from .commands.quantize import quantize
from .commands.repair import repair
from .commands.verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wan2diffusers")
def main():
    """Convert original Wan checkpoints (Wan 2.1, Wan 2.2) to the Diffusers layout, offline and streamed."""
    from .quiet import quiet_for_good

    quiet_for_good()  # library import notes (torchao's GPU kernels on a CPU, ...) are not our output


main.add_command(convert)
main.add_command(publish)
main.add_command(inspect_cmd)
main.add_command(verify)
main.add_command(repair)
main.add_command(quantize)
main.add_command(merge)

if __name__ == "__main__":
    main()
