"""LoRA adapters over one base model: read PEFT folders, check them, write GGUF LoRA files, merge.

A PEFT LoRA adapter changes each target weight W (out, in) of its base into

    W + scale * B @ A        A (r, in), B (out, r), scale = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

EpiCoDe with two adapters over one base (finetuned = base + dFT, inferior = base + dINF):

    expert  = finetuned + mu * (finetuned - inferior) = base + (1 + mu) * dFT - mu * dINF
    amateur = finetuned                               = base + dFT

so one base model and two small adapter files give both roles: llama.cpp applies adapters at run time
with a scale each (backends/llamacpp_lora.py). `convert_lora` writes such a shared-base bundle, or,
with merge=True, merges the adapters into full weights and writes a normal two-model bundle.

The GGUF LoRA layout is the one of llama.cpp's convert_lora_to_gguf.py: general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha, and per target the tensors `<gguf name>.lora_a` (r, in) and
`<gguf name>.lora_b` (out, r); llama.cpp scales each pair by alpha / r at run time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError, MismatchError, UnsupportedError
from .safetensors_io import SafetensorsFile, to_f32

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# base_model.model.<hf name>.lora_A[.<adapter name>].weight
_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter folder, opened lazily: config now, A/B tensors on demand.

    `targets` maps the base model's HF tensor name (e.g. model.layers.0.self_attn.q_proj.weight) to
    the names of its (lora_A, lora_B) tensors in adapter_model.safetensors.
    """

    path: Path
    config: dict
    r: int
    alpha: float
    base_model: str | None
    targets: dict[str, tuple[str, str]]
    scales: dict[str, float]  # target -> PEFT scale of its B @ A (alpha / r, rsLoRA and patterns applied)
    file: SafetensorsFile = field(repr=False)

    def rank(self, target: str) -> int:
        return self.file.entries[self.targets[target][0]].shape[0]

    def shape(self, target: str) -> tuple[int, int]:
        """(out, in) of the base weight this target changes."""
        a, b = self.targets[target]
        return self.file.entries[b].shape[0], self.file.entries[a].shape[1]

    def read_ab(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, in), B (out, r)) as float32."""
        a, b = self.targets[target]
        return self._f32(a), self._f32(b)

    def delta(self, target: str) -> np.ndarray:
        """scale * B @ A as float32, (out, in)."""
        a, b = self.read_ab(target)
        d = b @ a  # (out, r) @ (r, in) -> (out, in)
        s = self.scales[target]
        return d if s == 1.0 else (d * np.float32(s)).astype(np.float32, copy=False)

    def _f32(self, name: str) -> np.ndarray:
        return to_f32(self.file.read(name), self.file.entries[name].dtype)

    def close(self) -> None:
        close = getattr(self.file, "close", None)
        if close:
            close()


def read_adapter(path: str | Path) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) and check it."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not path.is_dir() or not cfg_path.is_file():
        raise InputError(f"{path}: not a PEFT LoRA adapter folder (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read adapter config ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: adapter config is not a JSON object")
    _check_config(config, cfg_path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (adapter_model.bin is not read: save with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise InputError(f"{path}: missing {WEIGHTS_FILE}{hint}")
    file = SafetensorsFile(weights)
    targets = _pair_tensors(file)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scales = {t: _peft_scale(config, t, file.entries[a].shape[0]) for t, (a, _) in targets.items()}
    return LoraAdapter(path, config, r, alpha, config.get("base_model_name_or_path"), targets, scales, file)


def _check_config(config: dict, cfg_path: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"{cfg_path}: peft_type {peft_type} is not supported (only LORA)")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise InputError(f"{cfg_path}: field {key!r} must be a positive number, got {v!r}")
    if config.get("use_dora"):
        raise UnsupportedError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    if config.get("fan_in_fan_out"):
        raise UnsupportedError(f"{cfg_path}: fan_in_fan_out adapters (Conv1D models) are not supported")
    if config.get("modules_to_save"):
        raise UnsupportedError(f"{cfg_path}: modules_to_save {config['modules_to_save']} (fully trained "
                               "modules) are not supported")


def _pair_tensors(file: SafetensorsFile) -> dict[str, tuple[str, str]]:
    """base HF tensor name -> (lora_A name, lora_B name), checking names and shapes."""
    found: dict[str, dict[str, str]] = {}
    for name in file.entries:
        m = _LORA_NAME.match(name)
        if m is None:
            what = "embedding LoRA" if "lora_embedding" in name else "not a lora_A/lora_B tensor"
            raise UnsupportedError(f"{file.path}: tensor {name!r}: {what} (not supported)")
        found.setdefault(m["base"] + ".weight", {})[m["ab"]] = name
    if not found:
        raise CheckpointError(f"{file.path}: no LoRA tensors")
    targets = {}
    for target, ab in found.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"{file.path}: tensor {next(iter(ab.values()))!r} has no {missing} partner")
        a, b = file.entries[ab["A"]], file.entries[ab["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{file.path}: tensors {a.name!r} {list(a.shape)} and {b.name!r} "
                                  f"{list(b.shape)} are not a LoRA pair (A (r, in), B (out, r))")
        if a.dtype not in ("F32", "F16", "BF16") or b.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{file.path}: tensor {a.name!r} has dtype {a.dtype} (need F32/F16/BF16)")
        targets[target] = (ab["A"], ab["B"])
    return targets


def _pattern_value(patterns: dict, target: str):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it."""
    module = target[: -len(".weight")]
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _peft_scale(config: dict, target: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), target)
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
