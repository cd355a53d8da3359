"""Tiny, deterministic HF checkpoints and tokenizers for tests ("pico" models, as mergekit does).

Nothing here downloads: the tokenizer is a byte-level BPE trained on a built-in corpus with the
`tokenizers` library, the weights are seeded numpy arrays written as safetensors (bf16 included).

    tok_dir = make_tokenizer(tmp / "tok")
    ft = make_hf_model(tmp / "ft", arch="qwen2", dtype="bfloat16", shards=2, seed=1)
    ft, inf = make_pair(tmp, arch="llama")   # finetuned and an "earlier checkpoint" of it
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from epicode_edge.converters.safetensors_io import from_f32, write_safetensors

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 17 + 25? Answer: 17 + 25 = 42.",
    "Multiply 3 by 4, then add 5: 3 * 4 = 12, 12 + 5 = 17. The answer is 17.",
    "Café crème, naïve façade, señor, Zürich, Ångström, œuvre.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 😀 🚀 👍🏽 ❤️ 🎉",
    "def add(a, b):\n    return a + b\n",
    "Law, math and logic: if all A are B and x is A, then x is B.",
    "   leading spaces, tabs\tand\nnewlines\n\n",
    "0123456789 3.14159 -42 1e10 100%",
]

# The split regexes of Llama 3 and Qwen2 tokenizer.json files.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

ARCHS = ("llama", "qwen2", "qwen3")


def make_tokenizer(out: Path, vocab_size: int = 384, add_bos: bool = True, split_regex: str | None = None) -> Path:
    """A byte-level BPE tokenizer folder (tokenizer.json + tokenizer_config.json) with Llama-3 style
    special tokens and a chat template. Deterministic for a given vocab_size.

    split_regex: pre-split with this regex before the byte-level step, as Llama 3 / Qwen2 tokenizers do
    (LLAMA3_SPLIT, QWEN2_SPLIT); None keeps GPT-2's built-in ByteLevel regex."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_regex is not None:
        from tokenizers import Regex

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
        "unk_token": None,  # else transformers 5 appends a default <|endoftext|> to the vocabulary
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": cfg["bos_token"], "eos_token": cfg["eos_token"], "pad_token": cfg["pad_token"]}, indent=2))
    return out


def make_config(arch: str, vocab_size: int, dtype: str = "float32", *, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 128, tie: bool = False,
                bos_id: int = 0, eos_id: int = 4) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    cfg = {
        "architectures": {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"], "qwen3": ["Qwen3ForCausalLM"]}[arch],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5 if arch == "llama" else 1e-6,
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    if arch == "qwen3":
        cfg["head_dim"] = hidden // heads
    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    return cfg


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """float32 weights for cfg, scaled so that logits are well spread (not near-uniform)."""
    rng = np.random.default_rng(seed)
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def lin(o, i, scale=1.0):
        return (rng.standard_normal((o, i)) * scale / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(nq, h, 2.0)
        w[p + "self_attn.k_proj.weight"] = lin(nkv, h, 2.0)
        w[p + "self_attn.v_proj.weight"] = lin(nkv, h)
        if cfg["model_type"] == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (0.1 * rng.standard_normal(nq)).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (0.1 * rng.standard_normal(nkv)).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (0.1 * rng.standard_normal(nkv)).astype(np.float32)
        if cfg["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "self_attn.o_proj.weight"] = lin(h, nq)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter)
    w["model.norm.weight"] = norm(h)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(v, h, 4.0)
    return w


_TAG = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_hf(out: Path, cfg: dict, weights: dict[str, np.ndarray], tokenizer_dir: Path, dtype: str = "float32",
             shards: int = 1) -> Path:
    """Write an HF folder: config.json, safetensors (single file or `shards` files + index), tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    tag = _TAG[dtype]
    names = list(weights)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    groups = [sorted(g, key=names.index) for g in groups]
    if shards == 1:
        write_safetensors(out / "model.safetensors", {n: (from_f32(weights[n], tag), tag) for n in names},
                          {"format": "pt"})
        return out
    weight_map, total = {}, 0
    for k, g in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / fname, {n: (from_f32(weights[n], tag), tag) for n in g}, {"format": "pt"})
        for n in g:
            weight_map[n] = fname
            total += weights[n].size * (4 if tag == "F32" else 2)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def make_hf_model(out: Path, arch: str = "llama", dtype: str = "float32", shards: int = 1, seed: int = 0,
                  tokenizer_dir: Path | None = None, **cfg_kw) -> Path:
    """One tiny HF checkpoint folder with its own tokenizer (made next to it unless given)."""
    out = Path(out)
    if tokenizer_dir is None:
        tokenizer_dir = make_tokenizer(out.parent / (out.name + ".tok"))
    vocab = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"] if t["content"] not in vocab["model"]["vocab"])
    cfg = make_config(arch, n_vocab, dtype, **cfg_kw)
    return write_hf(out, cfg, random_weights(cfg, seed), tokenizer_dir, dtype, shards)


def make_pair(root: Path, arch: str = "llama", dtype: str = "float32", shards: int = 1, seed: int = 0,
              delta: float = 0.05, **cfg_kw) -> tuple[Path, Path]:
    """(finetuned, inferior): two checkpoints of one "run"; inferior = finetuned - delta * noise.

    Both share one tokenizer. Returned folders: root/finetuned, root/inferior.
    """
    root = Path(root)
    tok = make_tokenizer(root / "tokenizer")
    vocab = json.loads((tok / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"])
    cfg = make_config(arch, n_vocab, dtype, **cfg_kw)
    ft = random_weights(cfg, seed)
    rng = np.random.default_rng(seed + 1000)
    inf = {n: (a - delta * rng.standard_normal(a.shape).astype(np.float32) * (np.std(a) + 1e-3)).astype(np.float32)
           for n, a in ft.items()}
    return (write_hf(root / "finetuned", cfg, ft, tok, dtype, shards),
            write_hf(root / "inferior", cfg, inf, tok, dtype, shards))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(out: Path, base_dir: Path, rank: int = 4, seed: int = 0, alpha: float | None = None,
                      strength: float = 0.1, target_modules=LORA_TARGETS, dtype: str = "float32",
                      like: Path | None = None, drift: float = 0.5) -> Path:
    """One PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the HF model
    in base_dir. Each targeted W (out, in) gets dW = (alpha / r) * B @ A with entries about
    strength * std(W). With `like` (another adapter folder of the same shapes), the new adapter is an
    "earlier checkpoint" of it: A, B = (1 - drift) * theirs + noise."""
    from epicode_edge.converters.safetensors_io import SafetensorsFile, to_f32

    out, base_dir = Path(out), Path(base_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((base_dir / "config.json").read_text())
    alpha = float(2 * rank if alpha is None else alpha)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"q_proj": (nq, h), "k_proj": (nkv, h), "v_proj": (nkv, h), "o_proj": (h, nq),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    group = {m: ("self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp") for m in shapes}
    prev = None
    if like is not None:
        f = SafetensorsFile(Path(like) / "adapter_model.safetensors")
        prev = {n: to_f32(f.read(n), f.entries[n].dtype) for n in f.entries}
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in target_modules:
            o, n_in = shapes[m]
            p = f"base_model.model.model.layers.{i}.{group[m]}.{m}"
            # (r, in) rows of norm ~1; (out, r) sized so that (alpha / r) * B @ A ~ strength / sqrt(in)
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((o, rank)) * strength * np.sqrt(rank) / alpha).astype(np.float32)
            if prev is not None:
                a = ((1 - drift) * prev[p + ".lora_A.weight"] + drift * a).astype(np.float32)
                b = ((1 - drift) * prev[p + ".lora_B.weight"] + drift * b).astype(np.float32)
            tensors[p + ".lora_A.weight"] = a
            tensors[p + ".lora_B.weight"] = b
    tag = _TAG[dtype]
    write_safetensors(out / "adapter_model.safetensors", {n: (from_f32(t, tag), tag) for n, t in tensors.items()},
                      {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(target_modules), "base_model_name_or_path": str(base_dir), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }, indent=2))
    return out


def make_lora_pair(root: Path, base_dir: Path, rank: int = 4, seed: int = 0, **kw) -> tuple[Path, Path]:
    """(finetuned, inferior) PEFT adapters over one base: root/finetuned, root/inferior, where inferior is
    an "earlier checkpoint" of finetuned (same targets and rank, drifted weights)."""
    root = Path(root)
    ft = make_lora_adapter(root / "finetuned", base_dir, rank=rank, seed=seed, **kw)
    inf = make_lora_adapter(root / "inferior", base_dir, rank=rank, seed=seed + 1000, like=ft, **kw)
    return ft, inf


SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


def make_spm_tokenizer(out: Path, vocab_size: int = 512, files: tuple[str, ...] = ("model", "json")) -> Path:
    """A Llama-2 style SentencePiece tokenizer folder: BPE with byte fallback, <unk>=0 <s>=1 </s>=2,
    a user-defined <|eot_id|>=3, add_bos. files: "model" writes tokenizer.model, "json" writes the
    tokenizer.json that transformers converts from it (as HF repos ship both). Deterministic."""
    import io

    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["<|eot_id|>"],
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 512,
        "clean_up_tokenization_spaces": False, "chat_template": SPM_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if "json" in files:
        from transformers import AutoTokenizer

        conv = out / ".converted"
        AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(conv))
        tj = json.loads((conv / "tokenizer.json").read_text())
        shutil.rmtree(conv)
        # The layout Llama 2 / Mistral / TinyLlama repos ship (sentencepiece's own behaviour): a dummy
        # prefix "▁" before the text and spaces as "▁", no pre-tokenizer.
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        tj["pre_tokenizer"] = None
        tj["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    if "model" not in files:
        (out / "tokenizer.model").unlink()
    return out
