"""The `epicode-edge` command line: thin wiring from options to library calls.

Each command is a library function first; this file only parses options, shows progress and turns
EpicodeError into a one-line message with a non-zero exit code. Engines are imported lazily, so
`epicode-edge --help` works where one engine is missing.

Sections are owned by area (convert / runtime / apps): keep each command's wiring in its own block.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


@main.command("convert")
@click.option("--finetuned", required=True, type=click.Path(path_type=Path),
              help="The finetuned checkpoint (HF folder or .gguf), e.g. after epoch 2.")
@click.option("--inferior", required=True, type=click.Path(path_type=Path),
              help="An earlier checkpoint of the same run (HF folder or .gguf), e.g. after epoch 1.")
@click.option("--mu", required=True, type=float, help="Extrapolation strength: expert = ft + mu * (ft - inf).")
@click.option("--to", default="gguf", show_default=True, help="Output formats, comma-separated: gguf, mlx, hf.")
@click.option("--quant", default="Q8_0", show_default=True,
              help="GGUF quant types, comma-separated: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0.")
@click.option("--mlx-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize the MLX folders to this many bits (default: not quantized).")
@click.option("--mlx-group-size", type=int, default=64, show_default=True, help="MLX quantization group size.")
@click.option("--with-inferior", is_flag=True, help="Also export the inferior model (for comparisons).")
@click.option("--lambda", "lam", type=float, default=0.5, show_default=True, help="Default contrastive strength.")
@click.option("--alpha", type=float, default=0.1, show_default=True, help="Default plausibility threshold.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write.")
def convert_cmd(finetuned, inferior, mu, to, quant, mlx_bits, mlx_group_size, with_inferior, lam, alpha, force, out):
    """Extrapolate FINETUNED away from INFERIOR and write a bundle (expert + amateur models)."""
    import warnings

    from .converters.bundle import human_bytes
    from .converters.convert import convert
    from .converters.extrapolate import ExtrapolationWarning

    show = warnings.showwarning

    def show_warning(message, category, *args, **kw):
        if issubclass(category, ExtrapolationWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            show(message, category, *args, **kw)

    with warnings.catch_warnings(), _ConvertBar() as bar:
        warnings.simplefilter("always", ExtrapolationWarning)
        warnings.showwarning = show_warning
        bundle = convert(finetuned, inferior, out, mu=mu, to=to, quant=quant,
                         mlx_bits=int(mlx_bits) if mlx_bits else None, mlx_group_size=mlx_group_size,
                         with_inferior=with_inferior, force=force, lam=lam, alpha=alpha, progress=bar.update)
    s = bundle.summary
    rate = s["input_bytes"] / max(s["seconds"], 1e-9)
    what = "; ".join([f"gguf {','.join(bundle.quants)}"] * ("gguf" in bundle.formats)
                     + [f for f in bundle.formats if f != "gguf"])
    click.echo(f"Wrote {bundle.path} ({what}; roles {', '.join(bundle.roles)}): {human_bytes(s['output_bytes'])} "
               f"in {s['seconds']:.1f} s, read {human_bytes(s['input_bytes'])} at {human_bytes(rate)}/s, "
               f"peak memory {human_bytes(s['peak_rss_bytes'])}")


class _ConvertBar:
    """A tqdm bar over the input bytes of the extrapolation pass, then the later stages as its label."""

    def __enter__(self):
        self.bar = None
        return self

    def update(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.bytes_total or None, unit="B", unit_scale=True, desc="extrapolate",
                            file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
        if p.stage == "extrapolate":
            self.bar.update(p.bytes_done - self.bar.n)
            self.bar.set_postfix_str(p.name[-40:], refresh=False)
        else:
            self.bar.set_description(p.stage)
            self.bar.set_postfix_str(p.name, refresh=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


@main.command("info")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every file's sha256 against the manifest.")
def info_cmd(bundle, verify):
    """Show what a bundle holds: method parameters, sources, files per format and quant."""
    from .converters.bundle import describe, open_bundle

    for line in describe(open_bundle(bundle, verify=verify)):
        click.echo(line)

# ----------------------------------------------------------------------------------------------
# generate / chat / batch  (runtime, apps/chat.py, apps/batch.py)
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# eval / tune / demo  (apps/eval.py, apps/tune.py, apps/demo.py)
# ----------------------------------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
