"""mlx_lm.lora adapter folders made with mlx_lm's own tuner code, and mlx_lm's own fuse of them (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCALE = 2.0  # lora_parameters.scale of the adapters made here


def make_mlx_run(folder: Path, base: Path, kind: str = "lora", steps=(100, 200), rank: int = 4, num_layers: int = 2,
                 seed: int = 0, keys=None) -> dict[int, Path]:
    """An mlx_lm.lora adapter folder: adapter_config.json, NNNNNNN_adapters.safetensors per step and
    adapters.safetensors (the last), written with mlx_lm's tuner code; each "training" step moves every trainable
    parameter (lora_b away from its zero init, DoRA's magnitudes m too; kind "full": the last num_layers layers'
    own weights)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    folder.mkdir(parents=True)
    model, _ = load_model(Path(base))
    model.freeze()
    params = {"rank": rank, "scale": SCALE, "dropout": 0.0, **({"keys": keys} if keys else {})}
    mx.random.seed(seed)
    if kind == "full":  # as mlx_lm/lora.py's train_model: the last num_layers layers unfrozen, no LoRA
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
        params = None
    else:
        linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    (folder / "adapter_config.json").write_text(json.dumps({
        "model": str(base), "fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params,
        "iters": steps[-1], "save_every": steps[0], "adapter_path": str(folder), "learning_rate": 1e-5}, indent=4))
    files = {}
    for step in steps:
        moved = []
        for name, p in tree_flatten(model.trainable_parameters()):
            noise = mx.random.normal(p.shape)
            if name.endswith("lora_b"):
                p = p + 0.3 * noise
            elif name.endswith("lora_a"):
                p = p + 0.05 * noise / np.sqrt(p.shape[0])
            elif kind == "full" and p.ndim == 2:  # a layer's weight
                p = p + 0.1 * noise * mx.abs(p).mean()
            else:  # DoRA magnitude (out,), or a full run's norm weights
                p = p * (1 + 0.1 * noise)
            moved.append((name, p))
        model.update(tree_unflatten(moved))
        weights = dict(tree_flatten(model.trainable_parameters()))
        files[step] = folder / f"{step:07d}_adapters.safetensors"
        mx.save_safetensors(str(files[step]), weights)
        mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    return files


def mlx_fuse(base: Path, config: Path, applied: list[tuple[Path, float | None]]) -> dict[str, np.ndarray]:
    """mlx_lm's own fuse (as mlx_lm/fuse.py does it) of adapter files applied one after another, each at its
    scale (None: the config's), onto the base; the fused model's parameters as float32 numpy."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    cfg = json.loads(Path(config).read_text())
    model, _ = load_model(Path(base))
    if cfg["fine_tune_type"] == "full":  # mlx_lm's load_adapters for full: the weights loaded over the base
        for file, _ in applied:
            model.load_weights(str(file), strict=False)
        return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    for file, scale in applied:
        model.freeze()
        linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"], use_dora=cfg["fine_tune_type"] == "dora")
        model.load_weights(str(file), strict=False)
        fused = []
        for name, m in model.named_modules():
            if hasattr(m, "fuse"):
                if scale is not None:
                    m.scale = scale
                fused.append((name, m.fuse(dequantize=True)))
        model.update_modules(tree_unflatten(fused))
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
