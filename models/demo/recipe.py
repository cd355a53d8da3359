"""Recipe of the demo family: regenerate the data, train a tokenizer, pretrain a small Llama on a synthetic
arithmetic corpus, finetune it on the scarce task split for two epochs, and save the checkpoint after
epoch 1 (`inferior`) and after epoch 2 (`finetuned`) in HF format.

    pip install -e '.[train]'            # torch==2.13.0 (CPU)
    python models/demo/recipe.py         # about 10-20 minutes on a 2-core CPU

Deterministic: seeded data, seeded init and shuffling, 2 threads. Writes models/demo/{data,inferior,finetuned}
and models/demo/train_log.json (loss curves, runtime).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MODEL = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=512, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
PRETRAIN = dict(docs=150_000, steps=700, batch=32, seq=128, lr=3e-3, min_lr=3e-4, warmup=100, weight_decay=0.1)
FINETUNE = dict(epochs=2, batch=16, lr=5e-4, warmup=5, weight_decay=0.0)
SEED = 0
PROBE_EVERY = 700  # pretraining steps between probes (task expressions in the pretraining format)
MONITOR_ITEMS = 60  # dev items scored (torch greedy) after each epoch, for the log only


# ---------------------------------------------------------------------------------------------- tokenizer
def _no_digit_runs(text: str) -> str:
    """BPE training text with every digit on its own: the tokenizer then never merges two digits."""
    return "".join(c + " " if c.isdigit() else c for c in text)


def train_tokenizer(texts: list[str], out: Path) -> Path:
    """Byte-level BPE (GPT-2 pre-tokenizer, single digits) with Llama-3 style specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_no_digit_runs(t) for t in texts], trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
        "unk_token": None, "add_bos_token": True, "add_eos_token": False, "model_max_length": 256,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2) + "\n")
    return out


def chat_prefix(prompt: str) -> str:
    """The chat template rendered for one user turn (without the BOS, which the tokenizer adds)."""
    return (f"<|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---------------------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def pretrain_blocks(tok, docs: list[str], seq: int) -> np.ndarray:
    """Documents tokenized with BOS, concatenated and cut into (N, seq + 1) blocks."""
    ids = [i for enc in tok.encode_batch(docs) for i in enc.ids]
    n = len(ids) // (seq + 1)
    return np.asarray(ids[: n * (seq + 1)], dtype=np.int64).reshape(n, seq + 1)  # (N, seq+1)


def finetune_examples(tok, items: list[dict]) -> list[tuple[list[int], int]]:
    """(ids, n_prompt): prompt = BOS + chat prefix; target = worked solution + <|eot_id|>."""
    eot = tok.token_to_id("<|eot_id|>")
    out = []
    for it in items:
        p = tok.encode(chat_prefix(it["prompt"])).ids
        a = tok.encode(it["solution"], add_special_tokens=False).ids + [eot]
        out.append((p + a, len(p)))
    return out


def pad_batch(examples, pad: int):
    import torch

    t = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), t), pad, dtype=torch.long)  # (B, T)
    y = torch.full((len(examples), t), -100, dtype=torch.long)  # (B, T)
    for b, (ids, n_prompt) in enumerate(examples):
        x[b, : len(ids)] = torch.tensor(ids)
        y[b, n_prompt - 1: len(ids) - 1] = torch.tensor(ids[n_prompt:])
    return x, y


def train_step(model, opt, x, y, lr):
    import torch.nn.functional as F

    for g in opt.param_groups:
        g["lr"] = lr
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def make_opt(model, lr, weight_decay):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------- monitoring
def probe_prefix(prompt: str) -> str:
    return "Evaluate " + prompt[len("Compute "):] + "\n"


def greedy_accuracy(model, tok, items: list[dict], max_new: int = 48, prefix=None, marker="Answer:") -> float:
    """Exact-answer accuracy of greedy decoding (batched by prompt length, no padding needed)."""
    import torch

    eot = tok.token_to_id("<|eot_id|>")
    nl = tok.encode("\n", add_special_tokens=False).ids[0]
    groups: dict[int, list[tuple[list[int], str]]] = {}
    for it in items:
        ids = tok.encode((prefix or chat_prefix)(it["prompt"])).ids
        groups.setdefault(len(ids), []).append((ids, it["answer"]))
    correct = 0
    model.eval()
    with torch.no_grad():
        for group in groups.values():
            x = torch.tensor([ids for ids, _ in group])  # (B, T)
            done = torch.zeros(len(group), dtype=torch.bool)
            for _ in range(max_new):
                nxt = model(x)[:, -1].argmax(-1)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
                x = torch.cat([x, nxt[:, None]], dim=1)
                done |= (nxt == eot) | (nxt == nl)
                if done.all():
                    break
            for row, (ids, answer) in zip(x.tolist(), group):
                text = tok.decode(row[len(ids):], skip_special_tokens=True)
                correct += text.split("\n")[0].rsplit(marker, 1)[-1].strip() == answer
    model.train()
    return correct / len(items)


# ---------------------------------------------------------------------------------------------- saving
def save_hf(model, cfg: dict, tok_dir: Path, out: Path, dtype: str) -> Path:
    import torch
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    sd = {k: v.detach().to(tdt).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"], "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "max_position_embeddings": cfg["max_position_embeddings"], "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg["rope_theta"], "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"], "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


# ---------------------------------------------------------------------------------------------- main
def run(out: Path, pretrain_steps: int, dtype: str, task_steps: int = make_data.TASK_STEPS, log=print) -> dict:
    import torch

    from model import Llama

    t0 = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    splits = make_data.task_splits(steps=task_steps)
    make_data.write_splits(out / "data", splits)
    exclude = {it["prompt"] for items in splits.values() for it in items}
    docs = make_data.pretrain_corpus(PRETRAIN["docs"], exclude=exclude)
    tok_texts = docs[:20_000] + [chat_prefix(it["prompt"]) + it["solution"] for it in splits["train"]]
    work = Path(tempfile.mkdtemp(prefix="epicode-demo-recipe-"))
    tok_dir = train_tokenizer(tok_texts, work / "tokenizer")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cfg = dict(MODEL, vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id("<|begin_of_text|>"),
               eos_token_id=tok.token_to_id("<|eot_id|>"), pad_token_id=tok.token_to_id("<|end_of_text|>"))
    model = Llama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vocab {cfg['vocab_size']}, {n_params / 1e6:.2f}M parameters")

    # pretraining on the synthetic corpus
    blocks = torch.from_numpy(pretrain_blocks(tok, docs, PRETRAIN["seq"]))  # (N, seq+1)
    log(f"pretraining corpus: {blocks.numel() / 1e6:.2f}M tokens in {len(blocks)} blocks")
    g = torch.Generator().manual_seed(SEED)
    opt = make_opt(model, PRETRAIN["lr"], PRETRAIN["weight_decay"])
    pre_curve, order, pos, pre_probe = [], torch.randperm(len(blocks), generator=g), 0, []
    probe = splits["dev"][-MONITOR_ITEMS:]  # task expressions asked in the pretraining format
    for step in range(pretrain_steps):
        if pos + PRETRAIN["batch"] > len(order):
            order, pos = torch.randperm(len(blocks), generator=g), 0
        b = blocks[order[pos: pos + PRETRAIN["batch"]]]
        pos += PRETRAIN["batch"]
        lr = lr_at(step, pretrain_steps, PRETRAIN["lr"], PRETRAIN["min_lr"], PRETRAIN["warmup"])
        loss = train_step(model, opt, b[:, :-1], b[:, 1:], lr)
        pre_curve.append(round(loss, 4))
        if step % 50 == 0 or step == pretrain_steps - 1:
            log(f"pretrain step {step:4d}/{pretrain_steps} loss {loss:.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % PROBE_EVERY == 0 or step == pretrain_steps - 1:
            acc = greedy_accuracy(model, tok, probe, prefix=probe_prefix, marker="Result:")
            pre_probe.append((step + 1, round(acc, 3)))
            log(f"pretrain step {step + 1}: dev task chains asked in pretraining format, greedy accuracy {acc:.3f}")

    # finetuning on the scarce split, two epochs, a checkpoint after each
    examples = finetune_examples(tok, splits["train"])
    opt = make_opt(model, FINETUNE["lr"], FINETUNE["weight_decay"])
    steps_per_epoch = math.ceil(len(examples) / FINETUNE["batch"])
    ft_curve, epoch_loss, step, dev_acc = [], [], 0, {}
    for epoch in range(FINETUNE["epochs"]):
        order = torch.randperm(len(examples), generator=g).tolist()
        losses = []
        for k in range(steps_per_epoch):
            batch = [examples[i] for i in order[k * FINETUNE["batch"]: (k + 1) * FINETUNE["batch"]]]
            x, y = pad_batch(batch, cfg["pad_token_id"])
            lr = FINETUNE["lr"] * min(1.0, (step + 1) / FINETUNE["warmup"])
            losses.append(train_step(model, opt, x, y, lr))
            step += 1
        ft_curve += [round(v, 4) for v in losses]
        epoch_loss.append(round(float(np.mean(losses)), 4))
        name = "inferior" if epoch == 0 else "finetuned"
        save_hf(model, cfg, tok_dir, out / name, dtype)
        dev_acc[name] = greedy_accuracy(model, tok, splits["dev"][:MONITOR_ITEMS])
        log(f"finetune epoch {epoch + 1}: mean loss {epoch_loss[-1]:.4f} -> saved {name}, "
            f"dev[:{MONITOR_ITEMS}] greedy accuracy {dev_acc[name]:.3f} ({time.time() - t0:.0f}s)")

    shutil.rmtree(work)
    runtime = time.time() - t0
    record = {
        "model": cfg, "parameters": n_params, "task_steps": task_steps, "pretrain": dict(PRETRAIN, steps=pretrain_steps),
        "finetune": FINETUNE, "seed": SEED, "dtype": dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "runtime_s": round(runtime, 1),
        "pretrain_loss": pre_curve, "finetune_loss": ft_curve, "finetune_epoch_loss": epoch_loss,
        "monitor_dev_accuracy": {"items": MONITOR_ITEMS, **dev_acc},
        "monitor_pretrain_probe": pre_probe,
    }
    (out / "train_log.json").write_text(json.dumps(record) + "\n")
    log(f"done in {runtime:.0f}s")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="where data/, inferior/, finetuned/ go")
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--task-steps", type=int, default=make_data.TASK_STEPS)
    args = ap.parse_args()
    run(args.out, args.pretrain_steps, args.dtype, args.task_steps, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    random.seed(SEED)
    main()
