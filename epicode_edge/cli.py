"""The `epicode-edge` command line: thin wiring from options to library calls.

Each command is a library function first; this file only parses options, shows progress and turns
EpicodeError into a one-line message with a non-zero exit code. Engines are imported lazily, so
`epicode-edge --help` works where one engine is missing.

Sections are owned by area (convert / runtime / apps): keep each command's wiring in its own block.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import EpicodeError


class _Group(click.Group):
    """Turns library errors into `Error: <one line>` and exit code 1; Ctrl-C into exit code 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EpicodeError as e:
            raise click.ClickException(_one_line(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="epicode-edge")
def main():
    """EpiCoDe on your own machine: extrapolate a finetuned model's checkpoints, then decode
    contrastively with the extrapolated expert against the finetuned amateur, offline, on
    llama.cpp (CPU/CUDA/Metal) or MLX (Apple silicon).

    \b
    Typical use:
      epicode-edge convert --finetuned ft/ --inferior ep1/ --mu 0.3 --to gguf -o bundle/
      epicode-edge generate bundle/ "What is 17 * 23?"
      epicode-edge chat bundle/
    """


# ----------------------------------------------------------------------------------------------
# convert / info  (converters/)
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# generate / chat / batch  (runtime, apps/chat.py, apps/batch.py)
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# eval / tune / demo  (apps/eval.py, apps/tune.py, apps/demo.py)
# ----------------------------------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
