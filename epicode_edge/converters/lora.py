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

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..defaults import DEFAULT_ALPHA, DEFAULT_LAMBDA
from ..errors import CheckpointError, InputError, MismatchError, NumericError, UnsupportedError
from .checkpoint import Checkpoint
from .multimodal import text_tensor_name
from .safetensors_io import SafetensorsFile, from_f32, to_f32

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
    except RecursionError:
        raise InputError(f"{cfg_path}: cannot read adapter config (JSON nested too deeply)") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: adapter config is not a JSON object")
    _check_config(config, cfg_path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (adapter_model.bin is not read: save with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise InputError(f"{path}: missing {WEIGHTS_FILE}{hint}")
    file = SafetensorsFile(weights)
    try:
        targets = _pair_tensors(file)
    except BaseException:
        file.close()
        raise
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        ranks = _pattern_values(config, "rank_pattern", targets, cfg_path)
        alphas = _pattern_values(config, "alpha_pattern", targets, cfg_path)
        scales = {}
        for t, (a, _) in targets.items():
            _check_rank(file, a, ranks[t] if ranks[t] is not None else r, cfg_path)
            scales[t] = _peft_scale(config, alphas[t], file.entries[a].shape[0])
    except BaseException:
        file.close()
        raise
    return LoraAdapter(path, config, r, alpha, config.get("base_model_name_or_path"), targets, scales, file)


def _check_config(config: dict, cfg_path: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"{cfg_path}: peft_type {peft_type} is not supported (only LORA)")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise InputError(f"{cfg_path}: field {key!r} must be a positive number, got {v!r}")
    _check_rank_value(config["r"], "field 'r'", cfg_path)
    _check_alpha_value(config["lora_alpha"], "field 'lora_alpha'", cfg_path)
    for key, check in (("rank_pattern", _check_rank_value), ("alpha_pattern", _check_alpha_value)):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InputError(f"{cfg_path}: field {key!r} must be an object (module pattern -> value), got "
                             f"{type(patterns).__name__}")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")  # how PEFT matches it (peft/utils/other.py get_pattern_key)
            except re.error as e:
                raise InputError(f"{cfg_path}: {key} key {pattern!r} is not a valid regular expression ({e})") from None
            check(value, f"{key}[{pattern!r}]", cfg_path)
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
        if len(a.shape) == 2 and len(b.shape) == 2 and 0 in (a.shape[0], b.shape[1]):
            raise CheckpointError(f"{file.path}: tensor {a.name!r} {list(a.shape)} has rank 0 (an empty LoRA pair)")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{file.path}: tensors {a.name!r} {list(a.shape)} and {b.name!r} "
                                  f"{list(b.shape)} are not a LoRA pair (A (r, in), B (out, r))")
        if a.dtype not in ("F32", "F16", "BF16") or b.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{file.path}: tensor {a.name!r} has dtype {a.dtype} (need F32/F16/BF16)")
        targets[target] = (ab["A"], ab["B"])
    return targets


F32_MAX = float(np.finfo(np.float32).max)  # llama.cpp reads adapter.lora.alpha as a float32
PATTERN_SECONDS = 2.0  # the most time an adapter's rank_pattern or alpha_pattern may take to match its targets


def _check_rank_value(v, what: str, cfg_path: Path) -> int:
    """A LoRA rank: a positive integer (an integral float too, as JSON may write it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 1:
        raise InputError(f"{cfg_path}: {what} must be a positive integer (a LoRA rank), got {v!r}")
    return int(v)


def _check_alpha_value(v, what: str, cfg_path: Path) -> float:
    """A lora_alpha: a positive number that float32 holds (the GGUF adapter stores it so)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= F32_MAX):
        raise InputError(f"{cfg_path}: {what} must be a positive number of at most {F32_MAX:.4g}, got {v!r}")
    return float(v)


def _pattern_values(config: dict, key: str, targets, cfg_path: Path) -> dict:
    """target -> the value of the first `key` (rank_pattern / alpha_pattern) pattern matching its module, or
    None: PEFT's rule (peft/utils/other.py get_pattern_key): the module name matches "(.*[.])?(PATTERN)$",
    patterns in the config's order. The patterns are the user's regular expressions; one that backtracks
    without end (e.g. "(a|aa)+b") would hang convert, so all the matches of one config share a bound of
    PATTERN_SECONDS (the regex module's timeout; its default syntax is re's) and a pattern that runs past it
    is refused."""
    patterns = config.get(key) or {}
    if not patterns:
        return dict.fromkeys(targets)
    import time

    import regex

    try:
        compiled = [(p, regex.compile(rf"(.*\.)?({p})$"), v) for p, v in patterns.items()]
    except regex.error as e:  # re compiled it (_check_config); the regex module may still refuse one
        raise InputError(f"{cfg_path}: {key}: a key is not a valid regular expression ({e})") from None
    deadline = time.monotonic() + PATTERN_SECONDS
    out = {}
    for target in targets:
        module = target[: -len(".weight")]
        out[target] = None
        for p, rx, v in compiled:
            try:
                hit = rx.match(module, timeout=max(deadline - time.monotonic(), 1e-3))
            except TimeoutError:
                raise InputError(f"{cfg_path}: {key} key {p!r} takes more than {PATTERN_SECONDS:g} s to match "
                                 f"the module names (a regular expression that backtracks; simplify it)") from None
            if hit:
                out[target] = v
                break
    return out


def _check_rank(file: SafetensorsFile, a_name: str, r: int, cfg_path: Path) -> None:
    """The rank of a LoRA pair (rows of A) is the r its config gives it: PEFT builds the pair with that r and
    scales it by lora_alpha / r, so a mismatch is an adapter the config does not describe."""
    rank = file.entries[a_name].shape[0]
    if rank != int(r):
        raise MismatchError(f"{file.path}: tensor {a_name!r} has rank {rank}, but {cfg_path.name} gives r = "
                            f"{int(r)} for it (r / rank_pattern): the config and the tensors must agree")


def _peft_scale(config: dict, alpha, rank: int) -> float:
    """PEFT's scale of B @ A: alpha (the alpha_pattern value or lora_alpha) / r, or / sqrt(r) with rsLoRA."""
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------

def check_against_base(adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]], base_path) -> None:
    """Every target of the adapter is a 2-D weight of the base with the adapter's (out, in)."""
    for target in adapter.targets:
        shape = base_shapes.get(target)
        if shape is None:
            raise MismatchError(f"{adapter.path}: adapter targets tensor {target!r}, which base {base_path} "
                                "does not have (adapter made for another base model?)")
        if tuple(shape) != adapter.shape(target):
            raise MismatchError(f"{adapter.path}: tensor {target!r}: adapter is for shape "
                                f"{list(adapter.shape(target))}, base {base_path} has {list(shape)} "
                                "(adapter made for another base model?)")


def check_same_base(finetuned: LoraAdapter, inferior: LoraAdapter) -> None:
    """The two adapters name the same base model (when both name one)."""
    a, b = finetuned.base_model, inferior.base_model
    if a and b and _norm_base(a) != _norm_base(b):
        raise MismatchError(f"base_model_name_or_path differs: finetuned {finetuned.path} names {a!r}, "
                            f"inferior {inferior.path} names {b!r}")


def _norm_base(name: str) -> str:
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name.rstrip("/")


# ------------------------------------------------------------------------------------------------
# merged weights: base + sum(coef * delta) as a checkpoint
# ------------------------------------------------------------------------------------------------

class MergedCheckpoint(Checkpoint):
    """A base checkpoint with LoRA deltas merged in, read lazily tensor by tensor:

        W' = W + sum_k coef_k * scale_k * B_k @ A_k        (f32, stored back in W's dtype)

    `terms` is [(adapter, coef), ...]; finetuned = [(ft, 1)], expert = [(ft, 1 + mu), (inf, -mu)].
    It behaves like the HF checkpoint PEFT's merge_and_unload() + save_pretrained() would write, so the
    normal convert pipeline takes it as finetuned or inferior.
    """

    def __init__(self, base: Checkpoint, terms: list[tuple[LoraAdapter, float]], label: str | None = None):
        if base.format != "hf":
            raise UnsupportedError(f"{base.path}: the base model of LoRA adapters must be an HF folder")
        shapes = {n: t.shape for n, t in base.tensors.items()}
        for adapter, _ in terms:
            check_against_base(adapter, shapes, base.path)
        self.base, self.terms = base, [(a, float(c)) for a, c in terms if c != 0]
        self.path = Path(label) if label else base.path
        self.format, self.arch, self.config = base.format, base.arch, base.config
        self.tensors, self.tokenizer_dir = base.tensors, base.tokenizer_dir

    def read_f32(self, name: str) -> np.ndarray:
        w = self.base.read_f32(name)  # (out, in)
        terms = [(a, c) for a, c in self.terms if name in a.targets]
        if not terms:
            return w
        w = np.array(w, dtype=np.float32)  # own copy: the base read may be a read-only view
        for adapter, coef in terms:
            d = adapter.delta(name)  # (out, in)
            w += d if coef == 1.0 else np.float32(coef) * d
        if self.base.tensors[name].dtype in ("F16", "BF16"):
            w = to_f32(from_f32(w, self.base.tensors[name].dtype), self.base.tensors[name].dtype)
        return w

    def read(self, name: str) -> np.ndarray:
        if not any(name in a.targets for a, _ in self.terms):
            return self.base.read(name)
        return from_f32(self.read_f32(name), self.base.tensors[name].dtype)

    def tokenizer_digests(self) -> dict[str, str]:
        return self.base.tokenizer_digests()

    def content_hash(self) -> str:
        """Hash of the base content plus the adapters' files and coefficients (cheap, no merging)."""
        h = hashlib.sha256(self.base.content_hash().encode())
        for adapter, coef in self.terms:
            h.update(f"{adapter_hash(adapter)}*{coef!r}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        pass  # base and adapters belong to the caller


def adapter_hash(adapter: LoraAdapter) -> str:
    """sha256 over adapter_config.json and adapter_model.safetensors (other adapter types: their own sha256)."""
    if hasattr(adapter, "sha256"):  # converters/mlx_lora.py
        return adapter.sha256()
    h = hashlib.sha256()
    for f in (adapter.path / CONFIG_FILE, adapter.path / WEIGHTS_FILE):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# GGUF LoRA files (llama.cpp's convert_lora_to_gguf.py layout)
# ------------------------------------------------------------------------------------------------

LORA_TYPES = ("F32", "F16")


def write_lora_gguf(adapter: LoraAdapter, out: str | Path, config: dict, lora_type: str = "F32") -> Path:
    """Write one adapter as a GGUF LoRA file for the base model with HF `config`, atomically.

    Tensors in lora_type (F32 or F16): `<gguf name>.lora_a` (r, in) and `<gguf name>.lora_b` (out, r), the
    rows of lora_b permuted like the base's q/k weights where the GGUF export permutes those (llama rotary).
    llama.cpp scales each pair by adapter.lora.alpha / r; a PEFT scale that differs from that
    (rsLoRA, alpha_pattern) is folded into lora_b.
    """
    import gguf

    if lora_type not in LORA_TYPES:
        raise UnsupportedError(f"LoRA tensor type {lora_type!r} is not supported; choose {', '.join(LORA_TYPES)}")
    dtype = np.float32 if lora_type == "F32" else np.float16
    out = Path(out)
    name_of, permute_rows = _gguf_mapping(config)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), _gguf_arch(config))
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
        for target in adapter.targets:
            a, b = adapter.read_ab(target)  # (r, in), (out, r)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise NumericError(f"{adapter.file.path}: LoRA tensors of {target!r} hold NaN/Inf values")
            fold = adapter.scales[target] / (adapter.alpha / a.shape[0])
            if fold != 1.0:
                b = b * np.float32(fold)
            name = name_of(target)
            a = np.ascontiguousarray(a, dtype=dtype)
            b = np.ascontiguousarray(permute_rows(target, b), dtype=dtype)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise NumericError(f"{adapter.file.path}: LoRA tensors of {target!r} overflow {lora_type} "
                                   "(values beyond its range); use lora_type F32")
            writer.add_tensor(name + ".lora_a", a)
            writer.add_tensor(name + ".lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. a full disk: say which file
            e.filename = e.filename or str(out)
        raise
    return out


def fuse_lora_gguf(adapters: Sequence[tuple[Path, float]], out: str | Path) -> Path:
    """One GGUF LoRA file that applies the (GGUF LoRA file, scale) pairs at once, written atomically:

        sum_k scale_k * (alpha_k / r_k) * B_k @ A_k  ==  B' @ A'     A' = [A_1; A_2; ...]  (r_1 + r_2 + ..., in)
                                                                    B' = [c_1 B_1, c_2 B_2, ...]  (out, r_1 + ...)

    with c_k = scale_k * alpha_k / r_k folded into B (float32) and adapter.lora.alpha 0, so llama.cpp applies
    B' A' at scale 1. The expert's two adapters (finetuned x (1 + mu), inferior x (-mu)) become one: half the
    LoRA operations per adapted matmul. The same sum in exact arithmetic; float32 rounding apart.
    """
    import gguf

    out = Path(out)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # gguf weight name -> [(A_k, c_k B_k)]
    arch = None
    for path, scale in adapters:
        if float(scale) == 0.0:
            continue
        r = gguf.GGUFReader(str(path))
        arch = arch or r.fields["general.architecture"].contents()
        alpha = float(r.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()) if gguf.Keys.Adapter.LORA_ALPHA in r.fields \
            else 0.0
        ts = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
        for name in sorted(n[:-len(".lora_a")] for n in ts if n.endswith(".lora_a")):
            a, b = ts[name + ".lora_a"], ts[name + ".lora_b"]  # (r, in), (out, r)
            c = float(scale) * (alpha / a.shape[0] if alpha else 1.0)
            parts.setdefault(name, []).append((a, b * np.float32(c)))
    tmp = out.with_name(f"{out.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # processes may race to make it
    writer = gguf.GGUFWriter(str(tmp), arch or "llama")
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        for name, ab in parts.items():
            writer.add_tensor(name + ".lora_a", np.ascontiguousarray(np.concatenate([a for a, _ in ab], axis=0)))
            writer.add_tensor(name + ".lora_b", np.ascontiguousarray(np.concatenate([b for _, b in ab], axis=1)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def fused_roles(per_role: dict[str, list[tuple[Path, float]]], cache: Path) -> dict[str, list[tuple[Path, float]]]:
    """per_role with every role of two or more adapters given one fused file instead (fuse_lora_gguf), kept
    in cache/lora under the hash of the adapters' bytes and scales (made once, then reused). Where the cache
    cannot be written, the roles stay as they are (same model, more LoRA operations)."""
    from ..hashing import sha256_file

    out = {}
    for role, adapters in per_role.items():
        live = [(Path(p), float(s)) for p, s in adapters if float(s) != 0.0]
        if len(live) < 2:
            out[role] = adapters
            continue
        key = hashlib.sha256("".join(f"{sha256_file(p)}*{s!r}\n" for p, s in live).encode()).hexdigest()[:32]
        path = Path(cache) / "lora" / f"fused-{key}.gguf"
        try:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                fuse_lora_gguf(live, path)
                _prune(path.parent, keep=FUSED_KEEP)
            out[role] = [(path, 1.0)]
        except OSError:
            out[role] = adapters
    return out


FUSED_KEEP = 16  # fused adapters kept in the cache (tune makes one per mu), the least recently made go first


def _prune(folder: Path, keep: int) -> None:
    files = sorted(folder.glob("fused-*.gguf"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for p in files[keep:]:
        p.unlink(missing_ok=True)


def _gguf_arch(config: dict) -> str:
    import gguf

    from .gguf import check_arch

    return gguf.MODEL_ARCH_NAMES[check_arch(config)]


def _gguf_mapping(config: dict):
    """(hf name -> gguf name, (hf name, rows) -> rows as the base's GGUF export orders them).

    The names come from the export's table (gguf-py's tensor map for the arch); the rows of q/k are
    permuted as GGUFSink permutes the base's q/k weights (llama only), so B @ A lines up with W.
    """
    import gguf

    from .gguf import check_arch, hparams, permute_qk

    arch, hp = check_arch(config), hparams(config)
    table = gguf.get_tensor_name_map(arch, hp["n_layer"])

    def name_of(target: str) -> str:
        name = table.get_name(target, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedError(f"LoRA target {target!r} has no GGUF name for architecture {config['model_type']}")
        return name

    def permute_rows(target: str, rows: np.ndarray) -> np.ndarray:
        if arch != gguf.MODEL_ARCH.LLAMA:
            return rows
        if target.endswith("q_proj.weight"):
            return permute_qk(rows, hp["n_head"])
        if target.endswith("k_proj.weight"):
            return permute_qk(rows, hp["n_head_kv"])
        return rows

    return name_of, permute_rows


# ------------------------------------------------------------------------------------------------
# the shared-base bundle
# ------------------------------------------------------------------------------------------------

LAYOUT = "shared-base"


def base_config(base_ckpt: Checkpoint) -> dict:
    """The HF config fields the LoRA export needs: the HF base's config.json, or, for a GGUF base (llama
    only), the same fields read from its metadata. PEFT adapters trained on a GGUF base loaded by
    transformers are in HF layout (transformers un-permutes q/k on load), so they map like an HF base's."""
    if base_ckpt.format != "gguf":
        return base_ckpt.config
    m, arch = base_ckpt.config, base_ckpt.arch
    if arch != "llama":
        raise UnsupportedError(f"{base_ckpt.path}: a GGUF base for LoRA adapters must be a llama model, not {arch!r}")
    try:
        heads = int(m[f"{arch}.attention.head_count"])
        return {"model_type": arch, "hidden_size": int(m[f"{arch}.embedding_length"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(m.get(f"{arch}.attention.head_count_kv", heads)),
                "num_hidden_layers": int(m[f"{arch}.block_count"]),
                "intermediate_size": int(m[f"{arch}.feed_forward_length"]),
                "max_position_embeddings": int(m[f"{arch}.context_length"]),
                "rms_norm_eps": float(m[f"{arch}.attention.layer_norm_rms_epsilon"]),
                "vocab_size": int(base_ckpt.tensors["token_embd.weight"].shape[0])}
    except KeyError as e:
        raise CheckpointError(f"{base_ckpt.path}: GGUF metadata lacks {e.args[0]!r}") from None


def lora_relpath(which: str) -> str:
    return f"lora/{which}.gguf"


def role_scales(mu: float) -> dict[str, dict[str, float]]:
    """Adapter scales per role: expert = ft x (1 + mu) + inf x (-mu); amateur = ft x 1; inferior = inf x 1.
    A zero scale is left out, so mu = 0 gives the amateur's own adapter list."""
    roles = {"expert": {"finetuned": 1.0 + mu, "inferior": -mu},
             "amateur": {"finetuned": 1.0}, "inferior": {"inferior": 1.0}}
    return {r: {a: s for a, s in per.items() if s != 0} for r, per in roles.items()}


def open_adapters(base, finetuned, inferior, merge: bool = False):
    """(base checkpoint, finetuned adapter, inferior adapter), checked: HF or GGUF base, both adapters fit it,
    both name the same base model. merge: a GGUF base is checked as the HF checkpoint it exports to (any
    architecture that exports), else as llama.cpp's names (llama)."""
    from .checkpoint import open_checkpoint
    from .hub import resolve

    opened = []
    try:
        ft = read_any_adapter(finetuned)
        opened.append(ft)
        inf = read_any_adapter(inferior)
        opened.append(inf)
        check_same_base(ft, inf)
        if hasattr(ft, "kind") or hasattr(inf, "kind"):  # mlx_lm adapters: same type, rank and layers
            from .mlx_lora import check_pair

            check_pair(ft, inf)
        base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(resolve(base))
        if base_ckpt is not base:
            opened.append(base_ckpt)
        if base_ckpt.format == "gguf" and merge:  # merged over its HF export (gguf_to_hf.GGUFAsHF)
            from .gguf_to_hf import HF_CLASSES, hf_names, hf_plan

            arch = base_ckpt.arch
            if arch not in HF_CLASSES:
                hf_plan(base_ckpt)  # the one-line error of an architecture that does not export
            names = hf_names(arch, int(base_ckpt.config.get(f"{arch}.block_count") or 0))
            shapes = {names[g]: t.shape for g, t in base_ckpt.tensors.items() if g in names}
        elif base_ckpt.format == "gguf":  # a llama GGUF base (e.g. a published quantized model)
            name_of, _ = _gguf_mapping(base_config(base_ckpt))
            shapes = {}
            for t in set(ft.targets) | set(inf.targets):
                gname = name_of(t)  # e.g. blk.0.attn_q.weight
                if gname in base_ckpt.tensors:
                    shapes[t] = base_ckpt.tensors[gname].shape
        elif base_ckpt.format == "hf":
            shapes = {n: t.shape for n, t in base_ckpt.tensors.items()}
            if getattr(base_ckpt, "multimodal", None):  # adapters of the whole model, over its text model
                for a in (ft, inf):
                    onto_text_model(a, shapes, base_ckpt.multimodal)
        else:
            raise UnsupportedError(f"{base_ckpt.path}: the base model of LoRA adapters must be an HF folder or a GGUF file")
        check_against_base(ft, shapes, base_ckpt.path)
        check_against_base(inf, shapes, base_ckpt.path)
    except BaseException:
        for x in opened:
            x.close()
        raise
    return base_ckpt, ft, inf


def onto_text_model(adapter, base_names, model_type: str) -> None:
    """An adapter trained on a multimodal model (converters/multimodal.py), over its text model: each target
    named as the text model's tensor (a name the base already has is kept); the vision tower's and the
    projector's targets dropped, as the bundle has no vision model."""
    def rename(targets: dict) -> dict:
        out = {}
        for t, v in targets.items():
            try:
                name = t if t in base_names else text_tensor_name(t)
            except ValueError:
                raise MismatchError(f"{adapter.path}: adapter targets tensor {t!r}, which is neither the language "
                                    f"model's nor the vision tower's of the {model_type} base") from None
            if name is not None:
                out[name] = v
        return out

    adapter.targets, adapter.scales = rename(adapter.targets), rename(adapter.scales)
    if getattr(adapter, "magnitudes", None):  # DoRA (converters/mlx_lora.py)
        adapter.magnitudes = rename(adapter.magnitudes)
    if not adapter.targets:
        raise MismatchError(f"{adapter.path}: the adapter changes only the vision tower of the {model_type} base "
                            "(its text model, which the bundle holds, is unchanged)")


def read_any_adapter(path):
    """A PEFT adapter folder, or an mlx_lm.lora adapter file or folder (converters/mlx_lora.py); a Hub id is
    fetched first (converters/hub.py)."""
    from .hub import resolve
    from .mlx_lora import is_mlx_adapter, read_mlx_adapter

    path = resolve(path, what="adapter")
    return read_mlx_adapter(path) if is_mlx_adapter(path) else read_adapter(path)


def merge_adapter(base, adapter) -> Checkpoint:
    """base with one adapter merged in, as its trainer's tools merge it: PEFT's merge_and_unload, mlx_lm.fuse
    (LoRA: W + scale * B @ A; DoRA: converters/mlx_lora.py FusedCheckpoint, rows rescaled; an mlx_lm full run:
    its weights in place of the base's)."""
    if getattr(adapter, "kind", None) in ("dora", "full"):
        from .mlx_lora import FusedCheckpoint

        return FusedCheckpoint(base, adapter, label=str(adapter.path))
    return MergedCheckpoint(base, [(adapter, 1.0)], label=str(adapter.path))


def convert_lora(base, finetuned, inferior, out, *, mu, quant=("Q8_0",), merge: bool = False,
                 lam: float = DEFAULT_LAMBDA, alpha: float = DEFAULT_ALPHA, force: bool = False, progress=None,
                 lora_type: str | None = None, **convert_kw):
    """A bundle from two PEFT LoRA adapters (finetuned, inferior) over one base model: an HF folder, or a
    GGUF file such as a published quantized model (llama for a shared base; merged: what exports to HF).
    mlx_lm.lora adapter files or folders are taken too (converters/mlx_lora.py; DoRA ones merged only).

    merge=False: a shared-base bundle: gguf/base-<QUANT>.gguf per quant, lora/finetuned.gguf,
    lora/inferior.gguf, and the role scales in the manifest (layout "shared-base"). The adapters' tensors
    are lora_type, by default F32 when an F32 base is asked for, else F16 (half the memory; its rounding
    is far below that of a quantized base).
    merge=True: the adapters merged into full finetuned and inferior weights, then the normal
    convert (expert and amateur files; other keyword arguments go to convert()). A GGUF base is merged as
    the HF checkpoint its export would be (gguf_to_hf.GGUFAsHF: quantized tensors dequantized), so every
    output format is open to it (e.g. --to mlx from a quantized GGUF base).
    progress(convert.Progress), if given, is called as files are written. Returns the opened Bundle.
    """
    from .extrapolate import check_mu

    mu = check_mu(mu)
    quants = _quant_list(quant)
    if lora_type is None:
        lora_type = "F32" if "F32" in quants else "F16"
    lora_type = str(lora_type).upper()
    if lora_type not in LORA_TYPES:
        raise UnsupportedError(f"LoRA tensor type {lora_type!r} is not supported; choose {', '.join(LORA_TYPES)}")
    from .convert import check_formats, convert

    formats = check_formats(convert_kw.pop("to", "gguf"))
    check_model = convert_kw.pop("check_model", None)
    if merge:
        convert_kw["check_model"] = check_model
    if not merge:
        if formats != ["gguf"]:
            raise UnsupportedError("a shared-base (LoRA) bundle is GGUF only; use merge=True for other formats")
        unknown = set(convert_kw) - {"with_inferior", "mlx_bits", "mlx_group_size", "max_shard_bytes"}
        if unknown:  # the known ones are convert() options that do not apply: the inferior role is always there
            raise TypeError(f"convert_lora() got unexpected keyword arguments {sorted(unknown)}")
    base_ckpt, ft, inf = open_adapters(base, finetuned, inferior, merge)
    hf_view = None
    try:
        kinds = (getattr(ft, "kind", None), getattr(inf, "kind", None))
        if not merge and "dora" in kinds:
            raise UnsupportedError(f"{ft.path}: DoRA adapters cannot be applied by llama.cpp at run time (no "
                                   "shared-base bundle): merge them into full weights (--merge)")
        if not merge and "full" in kinds:
            raise UnsupportedError(f"{ft.path}: mlx_lm full finetuning saves layer weights, not adapters (no "
                                   "shared-base bundle): merge them over the base (--merge)")
        if merge:
            merge_base = base_ckpt
            if base_ckpt.format == "gguf":  # merged as the HF checkpoint its export would write (q/k rows, names)
                from .gguf_to_hf import GGUFAsHF

                merge_base = hf_view = GGUFAsHF(base_ckpt)
            return convert(merge_adapter(merge_base, ft), merge_adapter(merge_base, inf), out,
                           mu=mu, to=formats, quant=tuple(quants), lam=lam, alpha=alpha, force=force,
                           progress=progress, **convert_kw)
        from .convert import check_support

        check_support(base_ckpt, ["gguf"])  # config against shapes, chat template, tokenizer: before writing
        return _write_shared_base(base_ckpt, ft, inf, out, mu=mu, quants=quants, lam=lam, alpha=alpha,
                                  force=force, progress=progress, lora_type=lora_type, check_model=check_model)
    finally:
        ft.close(), inf.close()
        if hf_view is not None:
            hf_view.close()
        if base_ckpt is not base:
            base_ckpt.close()


def _quant_list(quant) -> list[str]:
    from .convert import check_quants

    return check_quants(quant)  # a list or a comma-separated string; canonical names, no repeats


def _write_shared_base(base_ckpt, ft, inf, out, *, mu, quants, lam, alpha, force, progress, lora_type,
                       check_model=None):
    import time

    from .bundle import BundleWriter, build_manifest, file_entry, gguf_relpath, open_bundle
    from .convert import Progress, peak_rss_bytes, check_decoding_defaults, write_error

    t0 = time.perf_counter()
    lam, alpha = check_decoding_defaults(lam, alpha)
    files: dict = {"gguf": {}, "lora": {}}
    hasher = base_ckpt.content_hasher()
    with BundleWriter(out, force) as bw:
        try:
            for i, q in enumerate(quants):
                rel = gguf_relpath("base", q)
                _write_base_gguf(base_ckpt, bw.path(rel), q, progress, hasher if i == 0 else None, (i, len(quants)))
                if check_model is not None:
                    check_model(bw.tmp / rel)
                files["gguf"][q] = {"base": file_entry(bw.tmp, rel)}
            for which, adapter in (("finetuned", ft), ("inferior", inf)):
                rel = lora_relpath(which)
                if progress:
                    progress(Progress("lora", 0, 0, 0, 0, which))
                write_lora_gguf(adapter, bw.path(rel), base_config(base_ckpt), lora_type)
                files["lora"][which] = file_entry(bw.tmp, rel, r=adapter.r, lora_alpha=adapter.alpha,
                                                  targets=len(adapter.targets), type=lora_type)
            if check_model is not None:  # each role as it will run: the base with its adapters at their scales
                check_roles(check_model, bw.tmp / gguf_relpath("base", quants[0]), bw.tmp, mu,
                            {"finetuned": ft.path, "inferior": inf.path})
            out_bytes = sum(e["bytes"] for per in files["gguf"].values() for e in per.values())
            out_bytes += sum(e["bytes"] for e in files["lora"].values())
            in_bytes = base_ckpt.nbytes + sum(a.file.path.stat().st_size for a in (ft, inf))
            manifest = build_manifest(
                layout=LAYOUT, mu=mu, lam=lam, alpha=alpha, arch=base_ckpt.arch,
                tokenizer_hash=base_ckpt.tokenizer_hash(),
                sources={"base": {"path": str(Path(base_ckpt.path).absolute()), "format": base_ckpt.format,
                                  "content_sha256": hasher.hexdigest()},
                         "finetuned": {"path": str(ft.path.absolute()), "format": getattr(ft, "format", "peft-lora"),
                                       "content_sha256": adapter_hash(ft)},
                         "inferior": {"path": str(inf.path.absolute()), "format": getattr(inf, "format", "peft-lora"),
                                      "content_sha256": adapter_hash(inf)}},
                files=files, lora={"scales": role_scales(mu)}, warnings=[],
                summary={"seconds": round(time.perf_counter() - t0, 3), "tensors": len(base_ckpt.tensors),
                         "input_bytes": in_bytes, "output_bytes": out_bytes, "peak_rss_bytes": peak_rss_bytes()})
            path = bw.commit(manifest)
        except OSError as e:  # a full disk, mostly: one line, and the temporary folder goes
            raise write_error(e, bw, _shared_base_bytes(base_ckpt, quants, (ft, inf))) from None
    return open_bundle(path)


def check_roles(check_model, base: Path, root: Path, mu: float, sources: dict | None = None) -> None:
    """check_model(base, adapters=[(GGUF LoRA file, scale), ...], role=role) for every role of a shared-base
    bundle (role_scales): with its adapters applied the model must load and give finite logits (an adapter
    whose lora_alpha is 1e30 gives finite tensors and a model that gives NaN). sources: adapter -> its
    folder, for the message."""
    for role, per in role_scales(mu).items():
        try:
            check_model(base, adapters=[(root / lora_relpath(w), s) for w, s in per.items()], role=role)
        except NumericError:
            terms = " + ".join(f"{s:g} x {sources.get(w, w) if sources else w}" for w, s in per.items())
            raise NumericError(f"the {role} model (base + {terms}) gives non-finite logits: the adapters' "
                               "scale (lora_alpha / r) or tensors are too large for the base") from None


def _shared_base_bytes(base_ckpt, quants, adapters) -> int:
    """About how many bytes a shared-base bundle takes: the base per quant plus the adapters."""
    from .convert import estimate_bytes

    base = estimate_bytes(base_ckpt, ["gguf"], quants, False, None) // 2  # estimate_bytes counts two roles
    return base + sum(a.file.path.stat().st_size for a in adapters)


def _write_base_gguf(base_ckpt, path: Path, quant: str, progress, hasher=None, part=(0, 1)) -> None:
    """One base GGUF; progress counts the input bytes over all parts (one part per quant)."""
    from .convert import Progress
    from .gguf import gguf_sink_for

    names = list(base_ckpt.tensors)
    total, done = base_ckpt.nbytes * part[1], base_ckpt.nbytes * part[0]
    with gguf_sink_for(base_ckpt, path, quant) as sink:
        for i, name in enumerate(names):
            info = base_ckpt.tensors[name]
            stored = base_ckpt.read(name)
            if hasher is not None:
                hasher.update(info, stored)
            direct = info.dtype in ("F32", "F16", "BF16")  # else a GGUF quant type: dequantized by the reader
            sink.write(name, to_f32(stored, info.dtype) if direct else base_ckpt.read_f32(name))
            done += info.nbytes
            if progress:
                progress(Progress("extrapolate", i + 1, len(names), done, total, f"base {quant}: {name}"))


def is_shared_base(bundle) -> bool:
    """Whether a Bundle (converters.bundle) is a shared-base LoRA bundle."""
    return bundle.manifest.get("layout") == LAYOUT


def shared_base_roles(bundle, quant: str | None = None) -> tuple[Path, dict[str, list[tuple[Path, float]]]]:
    """(base GGUF path, role -> [(adapter GGUF path, scale), ...]) of a shared-base bundle, checked."""
    from ..errors import BundleError

    m = bundle.manifest
    if not is_shared_base(bundle):
        raise BundleError(f"{bundle.path}: not a shared-base (LoRA) bundle")
    base = bundle.gguf("base", quant)
    lora_files = m["files"].get("lora")
    scales = (m.get("lora") or {}).get("scales")
    if not isinstance(lora_files, dict) or not isinstance(scales, dict):
        raise BundleError(f"{bundle.path}: invalid manifest (shared-base bundle without 'files.lora' or 'lora.scales')")
    roles = {}
    for role, per in scales.items():
        roles[role] = []
        for which, scale in per.items():
            entry = lora_files.get(which)
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise BundleError(f"{bundle.path}: invalid manifest (no lora file {which!r} for role {role})")
            p = bundle.path / entry["path"]
            if not p.is_file():
                raise BundleError(f"{p}: missing (listed in epicode.json for lora {which})")
            if "bytes" in entry and p.stat().st_size != entry["bytes"]:
                raise BundleError(f"{p}: size {p.stat().st_size} != {entry['bytes']} listed in epicode.json")
            roles[role].append((p, float(scale)))
    return base, roles
