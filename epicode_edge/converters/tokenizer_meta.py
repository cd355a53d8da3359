"""Tokenizer metadata for GGUF: an HF tokenizer folder -> the `tokenizer.ggml.*` keys llama.cpp reads.

Two vocabulary kinds, as llama.cpp's own converter handles them:
  - byte-level BPE (tokenizer.json, model BPE, ByteLevel decoder): tokenizer model "gpt2", tokens, types,
    merges, and the pre-tokenizer name (`tokenizer.ggml.pre`) that selects llama.cpp's split regex;
  - SentencePiece (tokenizer.model, or tokenizer.json with byte_fallback + Metaspace): tokenizer model "llama",
    tokens, scores, types.
Special token ids, add_bos/add_eos (as the HF tokenizer behaves) and the chat template come with both.

    meta = read_tokenizer(tok_dir, vocab_size=cfg["vocab_size"], arch="llama")
    meta.add_to(writer)    # a gguf.GGUFWriter
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf

from epicode_edge.errors import InputError, UnsupportedError

T = gguf.TokenType

# llama.cpp's converter identifies the BPE pre-tokenizer by hashing the token ids of this text
# (convert_hf_to_gguf.py get_vocab_base_pre). A few families we support; the rest fall back below.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5 / 3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
# Split regexes of HF tokenizers -> llama.cpp pre-tokenizer with the same regex.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE_REGEXES = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}
# SentencePiece vocabularies that llama.cpp's converter marks as adding no '▁' before the text (Gemma2Model,
# Gemma3Model: Gemma's normalizer only replaces spaces).
NO_SPACE_PREFIX_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3_text")
# Turn-end tokens that llama.cpp treats as end-of-generation; written as eot when present.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class TokenizerMeta:
    model: str                      # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None                 # BPE pre-tokenizer name, None for SentencePiece
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list | None = None
    add_space_prefix: bool | None = None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        for typ, tid in self.special_ids.items():
            getattr(w, f"add_{typ}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_tokenizer(tok_dir: str | Path, vocab_size: int, arch: str = "llama") -> TokenizerMeta:
    """The GGUF tokenizer metadata of the HF tokenizer in tok_dir, padded to vocab_size (config.json)."""
    tok_dir = Path(tok_dir)
    tj_path = tok_dir / "tokenizer.json"
    tj = _load_json(tj_path) if tj_path.is_file() else None
    if tj is not None and _is_byte_level_bpe(tj):
        meta = _bpe_vocab(tok_dir, tj, vocab_size, arch)
    elif (tok_dir / "tokenizer.model").is_file():
        meta = _spm_vocab_from_model(tok_dir, tj, vocab_size)
    elif tj is not None and tj.get("model", {}).get("type") == "BPE" and tj["model"].get("byte_fallback"):
        meta = _spm_vocab_from_json(tok_dir, tj, vocab_size)
    elif tj is None:
        raise InputError(f"{tok_dir}: no tokenizer.json or tokenizer.model")
    else:
        raise UnsupportedError(
            f"{tj_path}: tokenizer model {tj.get('model', {}).get('type')!r} is not supported "
            "(supported: byte-level BPE, SentencePiece)")
    _add_specials(meta, tok_dir, vocab_size, tj)
    if arch in NO_SPACE_PREFIX_ARCHS and meta.model == "llama":
        meta.add_space_prefix = False
    return meta


# ----------------------------------------------------------------------------------------------- BPE

def _is_byte_level_bpe(tj: dict) -> bool:
    m = tj.get("model", {})
    dec = tj.get("decoder") or {}
    decs = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return m.get("type") == "BPE" and not m.get("byte_fallback") and any(d.get("type") == "ByteLevel" for d in decs)


def _bpe_vocab(tok_dir: Path, tj: dict, vocab_size: int, arch: str) -> TokenizerMeta:
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            a = added[i]
            tokens.append(a["content"])
            types.append(T.CONTROL if a.get("special") or _looks_special(a["content"]) else T.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    extra = [i for i in list(by_id) + list(added) if i >= vocab_size]
    if extra:
        raise InputError(f"{tok_dir / 'tokenizer.json'}: token id {max(extra)} >= config.json vocab_size {vocab_size}")
    with _quiet_gguf():
        merges = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size).merges
    return TokenizerMeta("gpt2", _pre_tokenizer(tok_dir, tj, arch), tokens, types, merges=merges)


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def _pre_tokenizer(tok_dir: Path, tj: dict, arch: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by the converter's hash, then by the split regex,
    then plain GPT-2 (a ByteLevel pre-tokenizer with its built-in regex), then by model family."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    chkhsh = sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    if chkhsh in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[chkhsh]
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(regexes) == 1 and regexes[0] in KNOWN_PRE_REGEXES:
        return KNOWN_PRE_REGEXES[regexes[0]]
    if not regexes and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if arch in ("qwen2", "qwen3"):
        return "qwen2"
    raise UnsupportedError(
        f"{tok_dir / 'tokenizer.json'}: unrecognised BPE pre-tokenizer; supported: GPT-2 ByteLevel, "
        f"{', '.join(sorted(set(KNOWN_PRE_HASHES.values())))}")


# ------------------------------------------------------------------------------------- SentencePiece

def _spm_vocab_from_model(tok_dir: Path, tj: dict | None, vocab_size: int) -> TokenizerMeta:
    """tokenizer.model through the sentencepiece package (as convert_hf_to_gguf _create_vocab_sentencepiece)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        if tj is not None and tj.get("model", {}).get("byte_fallback"):
            return _spm_vocab_from_json(tok_dir, tj, vocab_size)
        raise UnsupportedError(f"{tok_dir / 'tokenizer.model'}: reading it needs the sentencepiece package") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(tok_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                    else T.BYTE if sp.IsByte(i) else T.NORMAL)
    for i, a in _added_tokens(tok_dir, tj).items():
        if i < vocab_size and (i >= sp.vocab_size() or tokens[i] != a["content"] or types[i] == T.NORMAL):
            tokens[i] = a["content"]
            types[i] = T.CONTROL if a.get("special") else T.USER_DEFINED
            scores[i] = -1000.0 if i >= sp.vocab_size() else scores[i]
    return TokenizerMeta("llama", None, tokens, [int(t) for t in types], scores=scores,
                         add_space_prefix=_spm_add_prefix(tj))


def _spm_vocab_from_json(tok_dir: Path, tj: dict, vocab_size: int) -> TokenizerMeta:
    """tokenizer.json holding a SentencePiece BPE (byte_fallback, Metaspace): pieces keep their '▁';
    scores rank pieces as SentencePiece does (earlier merge = higher score)."""
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = _added_tokens(tok_dir, tj)
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i in added:
            a = added[i]
            tokens.append(a["content"])
            types.append(T.CONTROL if a.get("special") else T.USER_DEFINED)
            scores.append(0.0)
        elif i in by_id:
            t = by_id[i]
            tokens.append(t)
            types.append(T.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) else T.NORMAL)
            scores.append(0.0 if types[-1] == T.BYTE else -float(i))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1000.0)
    unk = tj["model"].get("unk_token")
    if unk in tj["model"]["vocab"]:
        types[tj["model"]["vocab"][unk]] = T.UNKNOWN
    return TokenizerMeta("llama", None, tokens, [int(t) for t in types], scores=scores,
                         add_space_prefix=_spm_add_prefix(tj))


def _spm_add_prefix(tj: dict | None) -> bool | None:
    """Whether a '▁' is prepended to the text (Metaspace prepend_scheme / add_prefix_space, or a Prepend
    normalizer), as the HF tokenizer does."""
    if tj is None:
        return None
    norm = tj.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" for n in norms):
        return True
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for p in parts:
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
    return False


def _added_tokens(tok_dir: Path, tj: dict | None) -> dict[int, dict]:
    """id -> {content, special} from tokenizer.json added_tokens and tokenizer_config added_tokens_decoder."""
    out = {a["id"]: a for a in (tj or {}).get("added_tokens", [])}
    cfg_path = tok_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        for i, a in (_load_json(cfg_path).get("added_tokens_decoder") or {}).items():
            out.setdefault(int(i), a)
    return out


# -------------------------------------------------------------------------------------- specials

def _add_specials(meta: TokenizerMeta, tok_dir: Path, vocab_size: int, tj: dict | None) -> None:
    with _quiet_gguf():
        sv = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=vocab_size,
                               special_token_types=("bos", "eos", "unk", "pad"))
    meta.special_ids = dict(sv.special_token_ids)
    for text in EOT_TEXTS:
        if text in meta.tokens:
            meta.special_ids.setdefault("eot", meta.tokens.index(text))
            break
    meta.chat_template = sv.chat_template
    meta.add_bos, meta.add_eos = _adds_bos_eos(tok_dir, tj, meta.special_ids)


def _adds_bos_eos(tok_dir: Path, tj: dict | None, ids: dict[str, int]) -> tuple[bool, bool]:
    """What the HF tokenizer does on encode(text): tokenizer_config add_bos_token/add_eos_token when set
    (LlamaTokenizer semantics), else what tokenizer.json's post-processor adds around a probe text."""
    cfg = _load_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").is_file() else {}
    add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
    if (add_bos is None or add_eos is None) and tj is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
        if add_bos is None:
            add_bos = "bos" in ids and full[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]]
        if add_eos is None:
            add_eos = "eos" in ids and full[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]]
    return bool(add_bos), bool(add_eos)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (RecursionError, UnicodeDecodeError):
        raise InputError(f"{path}: invalid JSON (nested too deeply, or not UTF-8)") from None


@contextmanager
def _quiet_gguf():
    """gguf-py logs warnings about unusual post-processors; library code stays silent."""
    log = logging.getLogger("gguf.vocab")
    old, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = old


# -------------------------------------------------------------------------------------- chat template

def chat_template_of(tok_dir) -> tuple[object, str] | None:
    """(the chat template as the GGUF export stores it: a string or a list of {name, template}, where it
    came from), or None when the tokenizer has none."""
    tok_dir = Path(tok_dir)
    with _quiet_gguf():
        sv = gguf.SpecialVocab(tok_dir, load_merges=False, special_token_types=())
    if not sv.chat_template:
        return None
    where = next((str(tok_dir / f) for f in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
                  if (tok_dir / f).is_file()), str(tok_dir))
    return sv.chat_template, where


def check_chat_template(template, where: str) -> None:
    """Every template parses as Jinja in the sandbox that renders it (llama-cpp-python parses it when it
    loads a model: a syntax error there makes the bundle unloadable). InputError naming line and problem."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    items = [("", template)] if isinstance(template, str) else [
        (f" {t.get('name')!r}" if isinstance(t, dict) else "", t.get("template") if isinstance(t, dict) else t)
        for t in (template or [])]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name, text in items:
        if not isinstance(text, str):
            raise InputError(f"{where}: chat template{name} is not a string")
        try:
            env.parse(text)
        except TemplateError as e:
            line = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise InputError(f"{where}: chat template{name} has a Jinja syntax error{line}: "
                             f"{' '.join(str(getattr(e, 'message', None) or e).split())}") from None
