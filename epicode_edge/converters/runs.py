"""A training run's output folder as the input of convert and tune: which checkpoint is which.

    run = read_run("out/")              # HF Trainer / TRL / Unsloth checkpoint-N/ folders, or mlx_lm adapters
    pick = run.pick()                   # finetuned: the last; inferior: the end of epoch 1 of 2, else the middle
    pick.lines()                        # the table of checkpoints and the choice, for the CLI to print
    convert(pick.finetuned, pick.inferior, ...)   # or convert_lora(pick.base, ...) for adapters

Trainer-style runs: each checkpoint-N/ holds full weights (config.json + safetensors) or a PEFT adapter
(adapter_config.json), and trainer_state.json (global_step, epoch, log_history). mlx_lm.lora runs: the adapter
folder's NNNNNNN_adapters.safetensors files beside adapter_config.json; mlx_lm writes no epochs, steps only.

The paper keeps the checkpoint after epoch 1 of a 2-epoch run as inferior and the one after epoch 2 as finetuned.
Generally: finetuned is the last checkpoint (or the one asked for), and inferior the checkpoint at the end of
the epoch halfway to it (epoch 1 of 2) where the run saved one there, else the checkpoint nearest halfway
by steps (the middle one).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

_CHECKPOINT = re.compile(r"^checkpoint-(?P<step>\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class RunCheckpoint:
    step: int
    epoch: float | None  # None: not recorded (mlx_lm, or no trainer_state.json)
    loss: float | None  # the last training loss logged at or before this step
    kind: str  # "full" | "peft-lora" | "mlx-lora" | "mlx-dora" | "mlx-full"
    path: Path

    @property
    def is_adapter(self) -> bool:
        return self.kind != "full"


@dataclass
class RunPick:
    """The two checkpoints taken from a run (each a RunCheckpoint of it, or a path given by the user), why, and
    the base model of adapters (None for full weights)."""

    run: "Run"
    finetuned: Path
    inferior: Path
    reason: str
    base: Path | str | None = None

    def lines(self) -> list[str]:
        """The table of the run's checkpoints with the two picks marked, then the reason."""
        marks = {self.finetuned: "finetuned", self.inferior: "inferior"}
        out = [f"Run {self.run.path} ({self.run.describe()}):",
               f"  {'step':>8}  {'epoch':>6}  {'loss':>8}  checkpoint"]
        for c in self.run.checkpoints:
            epoch = "-" if c.epoch is None else f"{c.epoch:.2f}"
            loss = "-" if c.loss is None else f"{c.loss:.4f}"
            mark = f"   <- {marks[c.path]}" if c.path in marks else ""
            out.append(f"  {c.step:>8}  {epoch:>6}  {loss:>8}  {c.path.name}{mark}")
        for role, p in (("finetuned", self.finetuned), ("inferior", self.inferior)):
            if p not in {c.path for c in self.run.checkpoints}:
                out.append(f"  {role}: {p} (given)")
        out.append(self.reason)
        for note in self.run.notes:
            out.append(f"Note: {note}")
        return out


@dataclass
class Run:
    path: Path
    source: str  # "trainer" | "mlx_lm"
    checkpoints: list[RunCheckpoint]  # by step
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kinds = sorted({c.kind for c in self.checkpoints})
        what = {"full": "full weights", "peft-lora": "PEFT LoRA adapters", "mlx-lora": "LoRA adapters",
                "mlx-dora": "DoRA adapters", "mlx-full": "mlx_lm full-finetuning weights"}
        src = "mlx_lm.lora" if self.source == "mlx_lm" else "Trainer checkpoints"
        return f"{src}, {' and '.join(what[k] for k in kinds)}, {len(self.checkpoints)} checkpoints"

    def find(self, value) -> Path:
        """A --finetuned / --inferior override: a step number of this run, or a path."""
        if isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, str) and value.isdigit()):
            step = int(value)
            for c in self.checkpoints:
                if c.step == step:
                    return c.path
            raise InputError(f"{self.path}: no checkpoint at step {step}; steps: "
                             f"{', '.join(str(c.step) for c in self.checkpoints)}")
        return Path(value)

    def pick(self, finetuned=None, inferior=None, base=None) -> RunPick:
        """finetuned: the last checkpoint unless given; inferior: the end of the epoch halfway to finetuned
        (epoch 1 of 2) where the run saved it there, else the middle checkpoint, unless given (step numbers
        or paths). base: the base model of adapter checkpoints (default: the one their config names, where
        it is a local folder or a cached Hub model)."""
        by_path = {c.path: c for c in self.checkpoints}
        ft_path = self.checkpoints[-1].path if finetuned is None else self.find(finetuned)
        ft = by_path.get(ft_path)
        why_ft = "the last checkpoint" if finetuned is None else "given"
        if inferior is not None:
            inf_path, why_inf = self.find(inferior), "given"
        else:
            inf_path, why_inf = self._halfway(ft)
        if inf_path == ft_path:
            raise InputError(f"{self.path}: finetuned and inferior are the same checkpoint ({ft_path.name})")
        inf = by_path.get(inf_path)
        reason = f"Finetuned: {_name(ft, ft_path)}, {why_ft}. Inferior: {_name(inf, inf_path)}, {why_inf}."
        adapters = [c for c in (ft, inf) if c is not None and c.is_adapter]
        if base is None and adapters:
            base = implied_base(adapters[0].path)
            if base is None:
                raise InputError(f"{adapters[0].path}: adapter checkpoints need their base model: give --base (their "
                                 "config names none that is a local folder or a cached Hub model)")
        return RunPick(self, ft_path, inf_path, reason, base)

    def _halfway(self, ft: RunCheckpoint | None) -> tuple[Path, str]:
        last = ft or self.checkpoints[-1]
        before = [c for c in self.checkpoints if c.step < last.step]
        if not before:
            raise InputError(f"{self.path}: no checkpoint before {last.path.name} to take as inferior")
        if last.epoch is not None and last.step > 0 and all(c.epoch is not None for c in before):
            tol = last.epoch / last.step + 1e-6  # one optimizer step, in epochs
            half = last.epoch / 2
            ends = [c for c in before if abs(c.epoch - round(c.epoch)) <= tol and round(c.epoch) >= 1
                    and abs(c.epoch - half) <= tol]
            if ends:
                c = min(ends, key=lambda c: abs(c.epoch - half))
                return c.path, (f"the end of epoch {round(c.epoch)} of {round(last.epoch)}, as the paper's inferior"
                                if abs(last.epoch - round(last.epoch)) <= tol else
                                f"the end of epoch {round(c.epoch)}, halfway to epoch {last.epoch:.2f}")
            why = (f"no checkpoint at the end of epoch {half:g} (halfway to epoch {last.epoch:.2f}): "
                   "the middle one by steps")
        elif self.source == "mlx_lm":
            why = "mlx_lm records steps, not epochs: the middle one by steps"
        else:
            why = "no epochs recorded (trainer_state.json): the middle one by steps"
        c = min(before, key=lambda c: (abs(c.step - last.step / 2), c.step))
        return c.path, f"{why}, step {c.step} of {last.step}"


def _name(c: RunCheckpoint | None, p: Path) -> str:
    return f"{p.name} (step {c.step}{'' if c.epoch is None else f', epoch {c.epoch:.2f}'})" if c else str(p)


def read_run(path) -> Run:
    """The checkpoints of a training run's output folder, by step; at least two (else one InputError)."""
    from .hub import resolve

    path = resolve(path, what="run")
    if not path.is_dir():
        raise InputError(f"{path}: no such folder (a training run's output folder)" if not path.exists()
                         else f"{path}: not a folder (a training run's output folder)")
    run = _trainer_run(path)
    if run is None:
        for folder in (path, path / "adapters"):  # mlx_lm's default --adapter-path is ./adapters
            if folder.is_dir():
                run = _mlx_run(folder)
                if run is not None:
                    break
    if run is None:
        raise InputError(f"{path}: no checkpoint-N folders (HF Trainer, TRL, Unsloth) nor mlx_lm numbered adapter "
                         "files (0000100_adapters.safetensors) in it")
    if len(run.checkpoints) < 2:
        found = ", ".join(c.path.name for c in run.checkpoints) or "none usable"
        raise InputError(f"{run.path}: a run with fewer than two checkpoints ({found}); EpiCoDe needs two of one "
                         "run (e.g. save at the end of each of two epochs)")
    kinds = {c.kind for c in run.checkpoints}
    if len(kinds) > 1:
        raise InputError(f"{run.path}: checkpoints of different kinds ({', '.join(sorted(kinds))}): not one run")
    return run


def _trainer_run(path: Path) -> Run | None:
    dirs = sorted((int(m["step"]), d) for d in path.iterdir() if (m := _CHECKPOINT.match(d.name)) and d.is_dir())
    if not dirs:
        return None
    notes, found = [], []
    for step, d in dirs:
        if (d / "adapter_config.json").is_file():
            kind = "peft-lora"
        elif (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            kind = "full"
        else:
            notes.append(f"{d.name} skipped: neither model weights (config.json + safetensors) nor a PEFT adapter")
            continue
        state = _read_state(d / STATE_FILE)
        step = int(state.get("global_step", step)) if _is_int(state.get("global_step")) else step
        epoch = float(state["epoch"]) if _is_number(state.get("epoch")) else None
        found.append((step, epoch, kind, d, state))
    history = []  # the longest log_history: the last checkpoint's, or the run folder's own state
    for state in [s for *_, s in found] + [_read_state(path / STATE_FILE)]:
        h = state.get("log_history")
        if isinstance(h, list) and len(h) >= len(history):
            history = h
    ckpts = [RunCheckpoint(step, epoch, _loss_at(history, step), kind, d) for step, epoch, kind, d, _ in found]
    return Run(path, "trainer", sorted(ckpts, key=lambda c: c.step), notes)


def _mlx_run(folder: Path) -> Run | None:
    from .mlx_lora import CONFIG_FILE, mlx_config_of, numbered_files

    cfg = folder / CONFIG_FILE
    if mlx_config_of(folder) is None:
        return None
    config = json.loads(cfg.read_text())
    fine_tune = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")
    kind = {"dora": "mlx-dora", "full": "mlx-full"}.get(fine_tune, "mlx-lora")
    files = numbered_files(folder)
    return Run(folder, "mlx_lm", [RunCheckpoint(step, None, None, kind, f) for step, f in files])


def _read_state(path: Path) -> dict:
    """trainer_state.json, or {} when missing; malformed: one InputError naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: cannot read the trainer state ({' '.join(str(e).split())})") from None
    return data if isinstance(data, dict) else {}


def _loss_at(history: list, step: int) -> float | None:
    best = None
    for entry in history:
        if isinstance(entry, dict) and _is_number(entry.get("loss")) and _is_int(entry.get("step")) \
                and entry["step"] <= step and (best is None or entry["step"] >= best[0]):
            best = (entry["step"], float(entry["loss"]))
    return None if best is None else best[1]


def implied_base(adapter) -> Path | str | None:
    """The base model an adapter's config names (PEFT base_model_name_or_path, mlx_lm model) when it is a local
    folder or a Hub model in the cache, else None (the caller asks for --base)."""
    from .hub import parse, resolve
    from .mlx_lora import mlx_config_of

    adapter = Path(adapter)
    cfg = mlx_config_of(adapter) or (adapter / "adapter_config.json" if adapter.is_dir() else None)
    if cfg is None or not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    name = config.get("base_model_name_or_path") or config.get("model") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    if parse(name) is None:
        return None
    try:
        return resolve(name, local_files_only=True)
    except InputError:
        return None


def base_or_implied(finetuned, base):
    """base, or for an adapter `finetuned` (PEFT folder or mlx_lm adapter) the base its config names (local or
    cached); for adapters with neither, one InputError asking for --base. Full checkpoints: base (None)."""
    from .mlx_lora import is_mlx_adapter

    if base is not None or finetuned is None:
        return base
    p = Path(str(finetuned)).expanduser()
    if not p.exists() or not ((p.is_dir() and (p / "adapter_config.json").is_file()) or is_mlx_adapter(p)):
        return None
    found = implied_base(p)
    if found is None:
        raise InputError(f"{p}: an adapter checkpoint needs its base model: give --base (its config names none "
                         "that is a local folder or a cached Hub model)")
    return found


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
