"""The GGUF's tokenizer (llama.cpp) against the HF tokenizer, token for token, BOS handling included.

Byte-level BPE (GPT-2 regex, Llama 3 regex, Qwen2 regex; with and without BOS) and SentencePiece
(tokenizer.model + tokenizer.json, either alone). Oracle: the tokenizer.json itself (tokenizers library) and
transformers' AutoTokenizer (what mlx_lm uses); for a tokenizer.model-only folder, sentencepiece itself.

Known difference, not ours: transformers 5 rebuilds a Llama SentencePiece tokenizer with a Metaspace
pre-tokenizer that adds no dummy prefix to a text that already starts with a space, where sentencepiece,
the tokenizer.json and llama.cpp do; AutoTokenizer is compared on the other texts there. And for
config model_type "qwen2" transformers 5 loads Qwen2Tokenizer, which replaces tokenizer.json's split regex
with Qwen2's (single digits); the GGUF follows tokenizer.json, so Qwen2 is tested with Qwen2's own regex.
"""

from __future__ import annotations

import pytest

import gguf
from epicode_edge.converters.gguf import hf_to_gguf
from factory import LLAMA3_SPLIT, QWEN2_SPLIT, make_hf_model, make_spm_tokenizer, make_tokenizer
from gguf_helpers import llama_model

PLAIN = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Café crème, naïve façade, señor, Zürich, Ångström, œuvre.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 😀 🚀 👍🏽 ❤️ 🎉 🦙",
    "   leading spaces, tabs\tand\nnewlines\n\n   trailing   ",
    "multiple     spaces\t\t\ttabs \n \n\n",
    "0123456789 3.14159 -42 1e10 100% 1234567",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "def add(a, b):\n    return a + b\n",
    "",
]
SPECIAL_BPE = ["Hi<|eot_id|>there", "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
               "<|begin_of_text|>twice"]
SPECIAL_SPM = ["a<|eot_id|>b", "<s>x</s>", "end.<|eot_id|>"]

KINDS = {  # name -> (tokenizer maker, arch, bos id, expected tokenizer.ggml.pre)
    "bpe_gpt2": (lambda d: make_tokenizer(d), "llama", 0, "gpt-2"),
    "bpe_nobos": (lambda d: make_tokenizer(d, add_bos=False), "llama", 0, "gpt-2"),
    "bpe_llama3": (lambda d: make_tokenizer(d, split_regex=LLAMA3_SPLIT), "llama", 0, "llama-bpe"),
    "bpe_qwen2": (lambda d: make_tokenizer(d, add_bos=False, split_regex=QWEN2_SPLIT), "qwen2", 0, "qwen2"),
    "spm": (lambda d: make_spm_tokenizer(d), "llama", 1, None),
    "spm_json": (lambda d: make_spm_tokenizer(d, files=("json",)), "llama", 1, None),
    "spm_model": (lambda d: make_spm_tokenizer(d), "llama", 1, None),  # tokenizer.json removed below
}


@pytest.fixture(scope="session")
def vocab(tmp_path_factory):
    """name -> (llama.cpp vocab-only model, HF folder, gguf fields)."""
    root, cache = tmp_path_factory.mktemp("tok_parity"), {}

    def get(name):
        if name not in cache:
            make, arch, bos, _ = KINDS[name]
            tok = make(root / f"{name}.tok")
            hf = make_hf_model(root / name, arch=arch, tokenizer_dir=tok, bos_id=bos, eos_id=bos + 1)
            if name == "spm_model":
                (hf / "tokenizer.json").unlink()
            path = hf_to_gguf(hf, root / f"{name}.gguf")
            fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
                      if k.startswith("tokenizer.ggml.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                       "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
            cache[name] = (llama_model(path, vocab_only=True), hf, fields)
        return cache[name]
    return get


def _llama_ids(llm, text):
    return llm.tokenize(text.encode(), add_bos=True, special=True)


@pytest.mark.parametrize("name", ["bpe_gpt2", "bpe_nobos", "bpe_llama3", "bpe_qwen2", "spm", "spm_json"])
def test_matches_tokenizer_json(name, vocab):
    from tokenizers import Tokenizer

    llm, hf, fields = vocab(name)
    assert fields.get("tokenizer.ggml.pre") == KINDS[name][3]
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    specials = SPECIAL_BPE if name.startswith("bpe") else SPECIAL_SPM
    for text in PLAIN + specials:
        assert _llama_ids(llm, text) == tok.encode(text).ids, repr(text)


@pytest.mark.parametrize("name", ["bpe_gpt2", "bpe_nobos", "bpe_llama3", "bpe_qwen2", "spm", "spm_json"])
def test_matches_auto_tokenizer(name, vocab):
    from transformers import AutoTokenizer

    llm, hf, _ = vocab(name)
    tok = AutoTokenizer.from_pretrained(str(hf))
    spm = name.startswith("spm")
    texts = [t for t in PLAIN if not (spm and t[:1].isspace())] + (SPECIAL_SPM if spm else SPECIAL_BPE)
    for text in texts:
        assert _llama_ids(llm, text) == tok.encode(text), repr(text)


def test_bos_handling(vocab):
    with_bos, _, f1 = vocab("bpe_gpt2")
    no_bos, _, f2 = vocab("bpe_nobos")
    assert f1["tokenizer.ggml.add_bos_token"] is True and f2["tokenizer.ggml.add_bos_token"] is False
    assert _llama_ids(with_bos, "Hello")[0] == 0
    assert 0 not in _llama_ids(no_bos, "Hello")
    assert _llama_ids(with_bos, "") == [0] and _llama_ids(no_bos, "") == []


def test_spm_model_only_matches_sentencepiece(vocab):
    import sentencepiece

    llm, hf, fields = vocab("spm_model")
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.bos_token_id"]) == ("llama", 1)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    for text in PLAIN:
        assert _llama_ids(llm, text) == [1] + sp.encode(text), repr(text)


@pytest.mark.parametrize("name", ["bpe_gpt2", "bpe_nobos", "bpe_llama3", "spm", "spm_model"])
def test_detokenize_round_trips(name, vocab):
    llm, _, fields = vocab(name)
    # llama-cpp-python's detokenize drops a leading space after a BOS (meant for SentencePiece's dummy
    # prefix); a byte-level BPE has no dummy prefix, so its BOS is left out here.
    skip = 1 if fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.add_bos_token"] else 0
    for text in PLAIN:
        assert llm.detokenize(_llama_ids(llm, text)[skip:]) == text.encode(), repr(text)
    if name.startswith("bpe"):
        for text in SPECIAL_BPE:
            ids = _llama_ids(llm, text)
            ids = ids[1:] if fields["tokenizer.ggml.add_bos_token"] else ids  # drop the added BOS
            assert llm.detokenize(ids, special=True) == text.encode(), repr(text)
