"""`demo`: the shipped demo family (models/demo) through the whole tool, offline, in well under a minute.

    for row in run_demo(n=6):          # converts the family into a cached bundle first
        print(render_row(row))

The bundle is cached in the user cache folder (EPICODE_EDGE_CACHE, else $XDG_CACHE_HOME/epicode-edge, else
~/.cache/epicode-edge), under a name made from the sources' content hash and the settings: a changed model or
setting makes a new bundle, an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..version import __version__
from ..errors import InputError, ParameterError
from . import tasks

FAMILY_ENV = "EPICODE_EDGE_DEMO_DIR"
CACHE_ENV = "EPICODE_EDGE_CACHE"
SETTINGS_FILE = "demo.json"  # models/demo/demo.json: mu, lambda, alpha chosen by `tune` on the dev split
FALLBACK = {"mu": 0.5, "lambda": 0.5, "alpha": 0.1}


def family_dir(path=None) -> Path:
    """The demo family folder: `path`, else $EPICODE_EDGE_DEMO_DIR, else models/demo of this checkout."""
    if path is None:
        path = os.environ.get(FAMILY_ENV) or Path(__file__).resolve().parents[2] / "models" / "demo"
    path = Path(path)
    for sub in ("finetuned", "inferior", "data/test.jsonl"):
        if not (path / sub).exists():
            raise InputError(f"{path / sub}: missing (the demo family lives in models/demo of the repository; "
                             f"run from a clone with `pip install -e .`, or set {FAMILY_ENV})")
    return path


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "epicode-edge"


def demo_settings(family: Path) -> dict:
    """mu / lambda / alpha for the demo: models/demo/demo.json (written from a dev-set tune), else defaults."""
    p = family / SETTINGS_FILE
    if not p.is_file():
        return dict(FALLBACK)
    try:
        s = json.loads(p.read_text())
        return {k: float(s[k]) for k in FALLBACK}
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{p}: invalid demo settings ({e})") from None


def _digest(paths, extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for root in paths:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def demo_bundle(family: Path, *, mu: float, quant: str = "Q8_0", with_inferior: bool = False,
                cache: Path | None = None, progress: Callable | None = None):
    """(Bundle, reused) for the family at mu: cached under the content hash of the sources and settings."""
    from ..converters.bundle import open_bundle
    from ..converters.convert import convert
    from ..errors import BundleError

    ft, inf = family / "finetuned", family / "inferior"
    key = _digest([ft, inf], {"mu": mu, "quant": quant, "with_inferior": with_inferior, "tool": __version__})
    path = (cache or cache_dir()) / f"demo-{key}"
    try:
        return open_bundle(path), True
    except BundleError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    return convert(ft, inf, path, mu=mu, to=("gguf",), quant=(quant,), with_inferior=with_inferior,
                   force=True, progress=progress), False


@dataclass
class DemoRow:
    item: tasks.Item
    finetuned_text: str
    finetuned_correct: bool
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # EpiCoDe's text pieces, changed flag
    epicode_correct: bool = False

    @property
    def epicode_text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    @property
    def changed(self) -> int:
        return sum(1 for _, c in self.pieces if c)


def run_demo(runtime, items: list[tasks.Item], *, max_tokens: int = 64, extract: str = "last-number",
             lam: float | None = None, alpha: float | None = None) -> Iterator[DemoRow]:
    """Answer each item with the finetuned model alone and with EpiCoDe (greedy), one DemoRow per item."""
    extractor = tasks.make_extractor(extract)
    settings = {k: v for k, v in (("lam", lam), ("alpha", alpha)) if v is not None}
    for item in items:
        ft = runtime.compare(item.chat(), max_tokens=max_tokens)
        pieces = []
        for ev in runtime.stream(item.chat(), max_tokens=max_tokens, **settings):
            if ev.text or ev.token is not None:
                pieces.append((ev.text, ev.changed))
        row = DemoRow(item, ft.text, tasks.is_correct(extractor(ft.text), item.answer, extract), pieces)
        row.epicode_correct = tasks.is_correct(extractor(row.epicode_text), item.answer, extract)
        yield row


def check_n(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise ParameterError(f"n must be an integer >= 1, got {n!r}")
    return n


# ---------------------------------------------------------------------------------------------- rendering


def render_row(i: int, total: int, row: DemoRow, color: bool = True) -> list[str]:
    """Lines for one prompt: the question, the finetuned answer, EpiCoDe's answer with the picks that
    contrastive decoding changed highlighted (bold yellow; [[...]] without colour)."""
    import click

    def mark(ok: bool) -> str:
        s = "right" if ok else "wrong"
        return click.style(s, fg="green" if ok else "red") if color else s

    def hi(text: str) -> str:
        return click.style(text, fg="yellow", bold=True, underline=True) if color else f"[[{text}]]"

    ep = "".join(hi(t) if c and t.strip() else t for t, c in row.pieces)
    return [
        f"[{i}/{total}] {row.item.text}   (answer: {row.item.answer})",
        f"  finetuned : {_flat(row.finetuned_text)}   <- {mark(row.finetuned_correct)}",
        f"  EpiCoDe   : {_flat(ep)}   <- {mark(row.epicode_correct)}"
        + (f"  ({row.changed} pick{'s' * (row.changed != 1)} changed)" if row.changed else ""),
    ]


def _flat(text: str) -> str:
    return " ".join(text.split())


def summary_lines(rows: list[DemoRow]) -> list[str]:
    n = len(rows)
    k_ft = sum(r.finetuned_correct for r in rows)
    k_ep = sum(r.epicode_correct for r in rows)
    changed = sum(r.changed for r in rows)
    return [f"Accuracy on these {n} prompts: finetuned {k_ft}/{n} ({100 * k_ft / n:.0f}%), "
            f"EpiCoDe {k_ep}/{n} ({100 * k_ep / n:.0f}%); contrastive decoding changed {changed} picks."]
