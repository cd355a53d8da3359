"""mlx_lm.lora adapters (LoRA and DoRA) as EpiCoDe inputs, read with numpy.

`mlx_lm.lora` saves the trainable parameters of its adapter layers (mlx_lm/tuner/lora.py, dora.py) with
mx.save_safetensors every --save-every steps as adapters/0000100_adapters.safetensors, ..., the latest also as
adapters/adapters.safetensors, beside adapters/adapter_config.json ({"fine_tune_type": "lora" | "dora",
"num_layers", "lora_parameters": {"rank", "scale", "dropout", "keys"}, "model", ...}). Per adapted linear layer
`<module>` (e.g. model.layers.1.self_attn.q_proj, the HF module name for llama / qwen2 / qwen3):

    <module>.lora_a (in, r)    <module>.lora_b (r, out)    DoRA also <module>.m (out,)

and mlx_lm's fuse (LoRALinear.fuse, DoRALinear.fuse) makes the weight W (out, in) of <module>.weight into

    LoRA:  W' = W + scale * lora_b.T @ lora_a.T
    DoRA:  V = W + scale * lora_b.T @ lora_a.T;   W' = (m / ||V||_rows)[:, None] * V     (row norms over `in`)

A LoRA adapter here is a PEFT one in all but layout (A = lora_a.T (r, in), B = lora_b.T (out, r), PEFT
scale = scale), so the shared-base bundle and merging of converters/lora.py take it as they are. DoRA is not
linear in its adapter: the expert of two DoRA checkpoints is the per-tensor extrapolation of the two fused
weights, (1 + mu) * W'_ft - mu * W'_inf, which no pair of run-time LoRA scales gives: DoRA is merged only.

`--fine-tune-type full` saves the trained layers' own weights under the model's parameter names (the last
num_layers layers unfrozen; "lora_parameters": null), which mlx_lm's load_adapters loads over the base
(mlx_lm/tuner/utils.py). The finetuned model is the base with those weights in place, so a full run is merged
only too, and its expert is the per-tensor extrapolation of the two weight sets.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError, MismatchError, UnsupportedError
from .checkpoint import Checkpoint
from .safetensors_io import SafetensorsFile, from_f32, to_f32

CONFIG_FILE = "adapter_config.json"
FINAL_FILE = "adapters.safetensors"  # mlx_lm's default --adapter-file name inside the adapter folder
NUMBERED = re.compile(r"^(?P<step>\d+)_adapters\.safetensors$")  # f"{it:07d}_adapters.safetensors"
KINDS = ("lora", "dora", "full")

_LEAF = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_a|lora_b|m)$")


def mlx_config_of(path: Path) -> Path | None:
    """The adapter_config.json that makes `path` an mlx_lm adapter (the folder's, or the one beside a
    .safetensors file), or None when it is not one (no such config, or a PEFT one)."""
    path = Path(path)
    cfg = path / CONFIG_FILE if path.is_dir() else path.with_name(CONFIG_FILE)
    if not cfg.is_file() or (not path.is_dir() and path.suffix != ".safetensors"):
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(data, dict) and ("lora_parameters" in data or "fine_tune_type" in data) and "peft_type" not in data:
        return cfg
    return None


def is_mlx_adapter(path) -> bool:
    return mlx_config_of(Path(path)) is not None


@dataclass
class MlxAdapter:
    """One mlx_lm adapter file with its folder's config, opened lazily; the interface of lora.LoraAdapter
    (targets, scales, r, alpha, shape, read_ab, delta) plus fuse() for DoRA and full (kind "full": targets are
    the weights the file holds, r 0 and scale 1)."""

    path: Path  # the .safetensors file
    config_path: Path
    config: dict
    kind: str  # "lora" | "dora"
    r: int
    scale: float
    base_model: str | None  # the config's "model": the base mlx_lm.lora trained on (a path or a Hub id)
    targets: dict[str, tuple[str, str]]  # base HF tensor name -> (lora_a name, lora_b name)
    magnitudes: dict[str, str]  # DoRA: base HF tensor name -> m name
    scales: dict[str, float]
    file: SafetensorsFile = field(repr=False)

    @property
    def format(self) -> str:
        return f"mlx-{self.kind}"

    @property
    def alpha(self) -> float:
        """PEFT's lora_alpha of the same scale (llama.cpp scales each pair by alpha / r)."""
        return self.scale * self.r

    def rank(self, target: str) -> int:
        return self.file.entries[self.targets[target][0]].shape[1]

    def shape(self, target: str) -> tuple[int, ...]:
        """(out, in) of the base weight this target changes (full: the weight's own shape)."""
        if self.kind == "full":
            return tuple(self.file.entries[target].shape)
        a, b = self.targets[target]
        return self.file.entries[b].shape[1], self.file.entries[a].shape[0]

    def read_ab(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """PEFT's (A (r, in), B (out, r)) as float32: lora_a.T and lora_b.T."""
        a, b = self.targets[target]
        return np.ascontiguousarray(self._f32(a).T), np.ascontiguousarray(self._f32(b).T)

    def delta(self, target: str) -> np.ndarray:
        """scale * lora_b.T @ lora_a.T as float32, (out, in)."""
        a, b = self.read_ab(target)
        return (np.float32(self.scale) * b) @ a  # (out, r) @ (r, in) -> (out, in)

    def fuse(self, target: str, w: np.ndarray) -> np.ndarray:
        """mlx_lm's fused weight (float32) of the base weight w (out, in): LoRA W + delta; DoRA rescaled rows;
        full: the trained weight, in place of w."""
        if self.kind == "full":
            return self._f32(target)
        v = np.asarray(w, dtype=np.float32) + self.delta(target)  # (out, in)
        if self.kind == "lora":
            return v
        m = self._f32(self.magnitudes[target])  # (out,)
        return (m / np.linalg.norm(v, axis=1))[:, None] * v

    def sha256(self) -> str:
        """sha256 over the config and the adapter file."""
        h = hashlib.sha256()
        for f in (self.config_path, self.path):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def _f32(self, name: str) -> np.ndarray:
        return to_f32(self.file.read(name), self.file.entries[name].dtype)

    def close(self) -> None:
        self.file.close()


def read_mlx_adapter(path) -> MlxAdapter:
    """Open an mlx_lm adapter: a .safetensors file (e.g. adapters/0000200_adapters.safetensors) beside its
    adapter_config.json, or the adapter folder (its adapters.safetensors). Checked: config fields, tensor
    names, pairs and shapes, the rank the config names."""
    path = Path(path)
    cfg_path = mlx_config_of(path)
    if cfg_path is None:
        raise InputError(f"{path}: not an mlx_lm adapter (no mlx_lm {CONFIG_FILE} beside it)")
    file_path = path / FINAL_FILE if path.is_dir() else path
    if not file_path.is_file():
        raise InputError(f"{path}: no {FINAL_FILE} (give one of the numbered adapter files of the folder)")
    config = json.loads(cfg_path.read_text())
    kind, r, scale = _check_config(config, cfg_path)
    file = SafetensorsFile(file_path)
    try:
        targets, magnitudes = _pair_tensors(file, kind, r)
    except BaseException:
        file.close()
        raise
    base = config.get("model")
    return MlxAdapter(file_path, cfg_path, config, kind, r, scale, base if isinstance(base, str) else None,
                      targets, magnitudes, {t: scale for t in targets}, file)


def _check_config(config: dict, cfg_path: Path) -> tuple[str, int, float]:
    kind = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")
    if kind == "full":  # the trained layers' weights; no LoRA parameters
        return kind, 0, 1.0
    if kind not in KINDS:
        raise UnsupportedError(f"{cfg_path}: field 'fine_tune_type' is {kind!r}; supported: {', '.join(KINDS)}")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise InputError(f"{cfg_path}: field 'lora_parameters' must be an object with rank and scale")
    r, scale = params.get("rank"), params.get("scale")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{cfg_path}: field 'lora_parameters.rank' must be a positive integer, got {r!r}")
    if scale is None and "alpha" in params:
        raise InputError(f"{cfg_path}: field 'lora_parameters.scale' is missing (mlx_lm uses scale, not alpha)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise InputError(f"{cfg_path}: field 'lora_parameters.scale' must be a finite nonzero number, got {scale!r}")
    return kind, r, float(scale)


def _pair_tensors(file: SafetensorsFile, kind: str, r: int) -> tuple[dict, dict]:
    """base HF tensor name -> (lora_a, lora_b) names, and DoRA's -> m name; names and shapes checked. full:
    each weight -> (its name, its name)."""
    if kind == "full":
        return _full_weights(file), {}
    found: dict[str, dict[str, str]] = {}
    for name in file.entries:
        m = _LEAF.match(name)
        if m is None or (m["leaf"] == "m" and kind != "dora"):
            raise UnsupportedError(f"{file.path}: tensor {name!r} is not an mlx_lm {kind} parameter "
                                   "(<module>.lora_a, .lora_b" + (", .m)" if kind == "dora" else ")"))
        if "embed_tokens" in m["module"]:
            raise UnsupportedError(f"{file.path}: tensor {name!r}: embedding LoRA is not supported")
        found.setdefault(m["module"], {})[m["leaf"]] = name
    if not found:
        raise CheckpointError(f"{file.path}: no LoRA tensors")
    targets, magnitudes = {}, {}
    need = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
    for module, parts in found.items():
        if set(parts) != need:
            missing = sorted(need - set(parts))
            raise CheckpointError(f"{file.path}: tensor {next(iter(parts.values()))!r} has no "
                                  f"{', '.join(module + '.' + x for x in missing)}")
        a, b = file.entries[parts["lora_a"]], file.entries[parts["lora_b"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise CheckpointError(f"{file.path}: tensors {a.name!r} {list(a.shape)} and {b.name!r} {list(b.shape)} "
                                  "are not an mlx_lm LoRA pair (lora_a (in, r), lora_b (r, out))")
        if a.shape[1] != r:
            raise CheckpointError(f"{file.path}: tensor {a.name!r} has rank {a.shape[1]}, the config's "
                                  f"lora_parameters.rank is {r}")
        for e in (a, b):
            if e.dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"{file.path}: tensor {e.name!r} has dtype {e.dtype} (need F32/F16/BF16)")
        target = module + ".weight"
        targets[target] = (parts["lora_a"], parts["lora_b"])
        if kind == "dora":
            mag = file.entries[parts["m"]]
            if tuple(mag.shape) != (b.shape[1],) or mag.dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"{file.path}: tensor {mag.name!r} {list(mag.shape)} {mag.dtype} is not the "
                                      f"DoRA magnitude of {module} (need [{b.shape[1]}], F32/F16/BF16)")
            magnitudes[target] = parts["m"]
    return targets, magnitudes


def _full_weights(file: SafetensorsFile) -> dict[str, tuple[str, str]]:
    out = {}
    for name, e in file.entries.items():
        if _LEAF.match(name):
            raise UnsupportedError(f"{file.path}: tensor {name!r} is an adapter parameter, but the config's "
                                   "fine_tune_type is full (layer weights)")
        if e.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{file.path}: tensor {name!r} has dtype {e.dtype} (need F32/F16/BF16)")
        out[name] = (name, name)
    if not out:
        raise CheckpointError(f"{file.path}: no weights")
    return out


def check_pair(ft, inf) -> None:
    """Two checkpoints of one mlx_lm run: both mlx_lm adapters of the same type, rank, scale and modules."""
    for a in (ft, inf):
        if not isinstance(a, MlxAdapter):
            other = inf if a is ft else ft
            raise MismatchError(f"{a.path}: not an mlx_lm adapter, while {other.path} is one (give two "
                                "checkpoints of one run)")
    if ft.kind != inf.kind:
        raise MismatchError(f"fine_tune_type differs: finetuned {ft.path} is {ft.kind}, inferior {inf.path} is {inf.kind}")
    if ft.r != inf.r:
        raise MismatchError(f"LoRA rank differs: finetuned {ft.path} has rank {ft.r}, inferior {inf.path} rank "
                            f"{inf.r} (not two checkpoints of one run)")
    if ft.scale != inf.scale:
        raise MismatchError(f"LoRA scale differs: finetuned {ft.path} has scale {ft.scale:g}, inferior {inf.path} "
                            f"scale {inf.scale:g} (not two checkpoints of one run)")
    a, b = set(ft.targets), set(inf.targets)
    if a != b:
        only = sorted(a - b) or sorted(b - a)
        which = ft if a - b else inf
        raise MismatchError(f"adapted layers differ: {which.path} adapts {len(only)} more, e.g. "
                            f"{only[0][:-len('.weight')]!r} (not two checkpoints of one run: same keys and num_layers)")


class FusedCheckpoint(Checkpoint):
    """A base HF checkpoint with one DoRA adapter, or one full run's weights, fused in as mlx_lm fuses them
    (MlxAdapter.fuse), read lazily tensor by tensor and stored back in each weight's dtype: the counterpart of
    lora.MergedCheckpoint for what is not a sum of LoRA deltas."""

    def __init__(self, base: Checkpoint, adapter: MlxAdapter, label: str | None = None):
        if base.format != "hf":
            raise UnsupportedError(f"{base.path}: the base model of LoRA adapters must be an HF folder")
        self.base, self.adapter = base, adapter
        self.path = Path(label) if label else base.path
        self.format, self.arch, self.config = base.format, base.arch, base.config
        self.tensors, self.tokenizer_dir = base.tensors, base.tokenizer_dir

    def read_f32(self, name: str) -> np.ndarray:
        w = self.base.read_f32(name)  # (out, in)
        if name not in self.adapter.targets:
            return w
        w = self.adapter.fuse(name, w)
        dtype = self.base.tensors[name].dtype
        if dtype in ("F16", "BF16"):
            w = to_f32(from_f32(w, dtype), dtype)
        return w

    def read(self, name: str) -> np.ndarray:
        if name not in self.adapter.targets:
            return self.base.read(name)
        return from_f32(self.read_f32(name), self.base.tensors[name].dtype)

    def tokenizer_digests(self) -> dict[str, str]:
        return self.base.tokenizer_digests()

    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.base.content_hash()}\n{self.adapter.sha256()}\n".encode()).hexdigest()

    def close(self) -> None:
        pass  # base and adapter belong to the caller


# ------------------------------------------------------------------------------------------------
# a folder of numbered adapter files: the checkpoints of one mlx_lm.lora run
# ------------------------------------------------------------------------------------------------

def numbered_files(folder) -> list[tuple[int, Path]]:
    """(step, file) of the folder's NNNNNNN_adapters.safetensors, by step."""
    folder = Path(folder)
    out = []
    for f in folder.iterdir():
        m = NUMBERED.match(f.name)
        if m and f.is_file():
            out.append((int(m["step"]), f))
    return sorted(out)
