"""HF tokenizer files from a GGUF's `tokenizer.*` metadata: the reverse of tokenizer_meta.py.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are rebuilt, and only with a pre-tokenizer
(`tokenizer.ggml.pre`) that has an exact HF counterpart (the split regexes llama.cpp uses for that name).
Anything else (SentencePiece "llama" vocabularies, unknown pre-tokenizers) is refused with an UnsupportedError
naming the file and the field: a tokenizer that encodes differently from the GGUF would be worse than none.

    files = hf_tokenizer_files(meta, where="model.gguf")   # {"tokenizer.json": str, "tokenizer_config.json": str, ...}
    for name, text in files.items():
        (out / name).write_text(text)

Token ids are kept: token i of `tokenizer.ggml.tokens` has id i. Control tokens become special added tokens,
user-defined ones plain added tokens; unused padding entries are left out of the vocabulary.
"""

from __future__ import annotations

import json

import gguf

from ..errors import UnsupportedError
from .tokenizer_meta import KNOWN_PRE_REGEXES, check_chat_template

T = gguf.TokenType
K = gguf.Keys.Tokenizer

_REGEX_OF = {name: regex for regex, name in KNOWN_PRE_REGEXES.items()}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _sequence(*parts: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(parts)}


# tokenizer.ggml.pre -> the HF pre-tokenizer that splits text as llama.cpp's regexes for that name do
# (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_*), and whether llama.cpp matches whole words before merging.
PRE_TOKENIZERS = {
    "gpt-2": (_byte_level(True), False),  # GPT-2's own regex, inside ByteLevel
    "llama-bpe": (_sequence(_split(_REGEX_OF["llama-bpe"]), _byte_level(False)), True),  # Llama 3.x
    "qwen2": (_sequence(_split(_REGEX_OF["qwen2"]), _byte_level(False)), False),  # Qwen 1.5 / 2 / 2.5 / 3
    "smollm": (_sequence({"type": "Digits", "individual_digits": True}, _byte_level(True)), False),  # SmolLM 1/2
}
SUPPORTED_PRE = tuple(PRE_TOKENIZERS)


def check_tokenizer(meta: dict, where) -> None:
    """UnsupportedError (one line naming `where` and the field) unless the tokenizer can be rebuilt exactly."""
    model = meta.get(K.MODEL)
    if model != "gpt2":
        kind = {"llama": "SentencePiece", None: "absent"}.get(model, "not byte-level BPE")
        raise UnsupportedError(f"{where}: {K.MODEL} is {model!r} ({kind}); only byte-level BPE ('gpt2') "
                               "tokenizers can be rebuilt for HF/MLX outputs (use --to gguf)")
    pre = meta.get(K.PRE)
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedError(f"{where}: {K.PRE} {pre!r} has no known HF pre-tokenizer; supported for HF/MLX "
                               f"outputs: {', '.join(SUPPORTED_PRE)} (use --to gguf)")
    tokens, types = meta.get(K.LIST), meta.get(K.TOKEN_TYPE)
    if not isinstance(tokens, list) or not tokens:
        raise UnsupportedError(f"{where}: no {K.LIST} in the GGUF metadata")
    if not isinstance(types, list) or len(types) != len(tokens):
        raise UnsupportedError(f"{where}: {K.TOKEN_TYPE} does not give one type per token")
    if not isinstance(meta.get(K.MERGES), list):
        raise UnsupportedError(f"{where}: no {K.MERGES} in the GGUF metadata (needed for a BPE tokenizer)")
    seen: dict[str, int] = {}
    for i, (text, typ) in enumerate(zip(tokens, types)):
        if typ == T.UNUSED:
            continue
        if text in seen:
            raise UnsupportedError(f"{where}: {K.LIST} holds {text!r} twice (ids {seen[text]} and {i})")
        seen[text] = i


def special_ids(meta: dict) -> dict[str, int]:
    """bos / eos / unk / pad / eot ids present in the metadata and inside the vocabulary."""
    keys = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "pad": K.PAD_ID, "eot": K.EOT_ID}
    n = len(meta.get(K.LIST) or [])
    return {role: meta[key] for role, key in keys.items() if isinstance(meta.get(key), int) and 0 <= meta[key] < n}


def hf_tokenizer_files(meta: dict, where, model_max_length: int | None = None) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (file name -> text) for the GGUF
    tokenizer in `meta` (the GGUF metadata; `where` names the file in errors)."""
    check_tokenizer(meta, where)
    tokens, types = meta[K.LIST], meta[K.TOKEN_TYPE]
    pre, ignore_merges = PRE_TOKENIZERS[meta[K.PRE]]
    ids = special_ids(meta)
    add_bos = bool(meta.get(K.ADD_BOS, meta[K.PRE] == "llama-bpe"))  # llama.cpp's default for Llama 3
    add_eos = bool(meta.get(K.ADD_EOS, False))
    vocab = {text: i for i, (text, typ) in enumerate(zip(tokens, types)) if typ != T.UNUSED}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == T.CONTROL}
             for i in range(len(tokens)) if types[i] in (T.CONTROL, T.USER_DEFINED)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": _post_processor(tokens, ids, add_bos, add_eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab,
                  "merges": [m.split(" ", 1) for m in meta[K.MERGES]]},
    }
    names = {role: tokens[i] for role, i in ids.items() if role in ("bos", "eos", "unk", "pad")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": names.get(role) for role in ("bos", "eos", "unk", "pad")},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length) if model_max_length else 1 << 30,
    }
    template = chat_template(meta)
    if template is not None:
        check_chat_template(template, f"{where} ({K.CHAT_TEMPLATE})")  # one that does not parse loads nowhere
        config["chat_template"] = template
    special_map = {f"{role}_token": text for role, text in names.items()}
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False, indent=1),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
            "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2)}


def _post_processor(tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool) -> dict:
    """What encode(text) adds around the text: bos and/or eos as the GGUF says, else nothing."""
    around = [(role, tokens[ids[role]]) for role, wanted in (("bos", add_bos), ("eos", add_eos))
              if wanted and role in ids]
    if not around:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    bos = [{"SpecialToken": {"id": text, "type_id": 0}} for role, text in around if role == "bos"]
    eos = [{"SpecialToken": {"id": text, "type_id": 0}} for role, text in around if role == "eos"]

    def seq(name: str, type_id: int) -> list[dict]:
        return [{"Sequence": {"id": name, "type_id": type_id}}]

    return {"type": "TemplateProcessing", "single": bos + seq("A", 0) + eos,
            "pair": bos + seq("A", 0) + eos + [_retype(t, 1) for t in bos] + seq("B", 1) + [_retype(t, 1) for t in eos],
            "special_tokens": {text: {"id": text, "ids": [ids[role]], "tokens": [text]} for role, text in around}}


def _retype(item: dict, type_id: int) -> dict:
    return {"SpecialToken": dict(item["SpecialToken"], type_id=type_id)}


def chat_template(meta: dict):
    """The GGUF's chat template as tokenizer_config.json holds it: a string, or a list of {name, template}
    when the GGUF also has named templates (tokenizer.chat_templates)."""
    default = meta.get(K.CHAT_TEMPLATE)
    names = meta.get(K.CHAT_TEMPLATES) or []
    named = [{"name": n, "template": meta[K.CHAT_TEMPLATE_N.format(name=n)]} for n in names
             if isinstance(meta.get(K.CHAT_TEMPLATE_N.format(name=n)), str)]
    if not named:
        return default if isinstance(default, str) else None
    return ([{"name": "default", "template": default}] if isinstance(default, str) else []) + named
