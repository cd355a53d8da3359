"""Structured output: a JSON Schema, a regular expression or a grammar restricts which tokens may come next.

The constraint engine is llguidance (its LLMatcher: a token mask per step, the forced continuation, Lark and
GBNF grammars, JSON Schema and regex); bench/constrain.py is the measurement it was chosen by. Its tokenizer is
built from the model's own vocabulary through the Backend protocol (token_bytes, token_texts, eos_ids,
tokenize), so a GGUF on llama.cpp and an MLX folder give the matcher the same tokens.

    c = parse_constraint({"type": "json_schema", "json_schema": {"schema": {...}}})   # or json_schema(...),
    m = Matcher(c, expert)                                                             # regex(...), grammar(...)
    allowed = m.allowed()        # (K,) token ids the constraint allows next, ascending
    m.consume([token])
    run = m.forced_run()         # the tokens the constraint forces next (the library's tokenization)

Constrained contrastive decoding (decoding/loop.py and decoding/batch_loop.py use `candidates`):
1. tokens the constraint forbids are out before anything else;
2. the plausibility mask is taken on the expert's distribution renormalised over the allowed tokens: keep v
   iff le'[v] >= log(alpha) + max(le') with le' the log-softmax over the allowed tokens. The test is shift
   invariant, so it is computed on the raw logits of the allowed tokens (the same set);
3. the pick maximises the contrastive score among those candidates (the amateur is read for them only);
4. where the constraint allows one token, it is emitted without a pick (no sampler draw) and the amateur is
   not needed for it (a skipped step of the lazy amateur).
Fast-forward (Settings.fast_forward, on by default): after each pick the forced continuation (`forced_run`,
e.g. the fixed keys of a JSON object) is emitted at once and fed to both models in one batch. What that
costs in exactness: the run is the library's canonical tokenization of the forced text, where step-by-step
decoding lets the model pick among the tokenizations of the same text, and the batch's logits differ from
token-by-token feeding by the engine's batch rounding (as catch_up="batch" in loop.py). With
fast_forward=False every token is a step, and lambda = 0 gives exactly the library's own constrained greedy
decoding of the expert (tests/test_constraint_loop.py drives the matcher itself to check it).
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConstraintError, InputError, UnsupportedError

KINDS = ("json_schema", "json_object", "regex", "grammar")
LIBRARY = "llguidance"


def _lib():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise UnsupportedError(f"structured output needs the llguidance package ({e}): pip install llguidance") \
            from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the answer must match. kind: one of KINDS; text: the JSON Schema (as JSON text), the regex or the
    grammar (Lark, or GBNF as llama.cpp reads it); where: what messages name (a file, a flag, a field)."""

    kind: str
    text: str = ""
    where: str = "the constraint"

    def grammar(self) -> str:
        """The llguidance grammar, checked: ConstraintError naming `where` and what is wrong."""
        return _grammar(self.kind, self.text, self.where)

    def as_response_format(self) -> dict:
        """The OpenAI-style response_format object (plus our regex / grammar types) that parses back to it."""
        if self.kind == "json_object":
            return {"type": "json_object"}
        if self.kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"schema": json.loads(self.text)}}
        return {"type": self.kind, self.kind: self.text}


def json_schema(schema: Any, where: str = "the JSON schema") -> Constraint:
    """A constraint from a JSON Schema (a dict, a bool or JSON text), checked."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConstraintError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{where}: a JSON schema must be an object (or true/false), got "
                              f"{type(schema).__name__}")
    c = Constraint("json_schema", json.dumps(schema), where)  # key order kept: it is the answer's
    c.grammar()
    return c


def json_object(where: str = "json_object") -> Constraint:
    """Any JSON object."""
    return Constraint("json_object", "", where)


def regex(pattern: str, where: str = "the regex") -> Constraint:
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError(f"{where}: a regex must be a non-empty string, got {pattern!r}")
    c = Constraint("regex", pattern, where)
    c.grammar()
    return c


def grammar(text: str, where: str = "the grammar") -> Constraint:
    """A Lark grammar, or a GBNF one (llama.cpp's format: `root ::= ...`)."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(f"{where}: a grammar must be non-empty text")
    c = Constraint("grammar", text, where)
    c.grammar()
    return c


def parse_constraint(value: Any, where: str = "response_format") -> Constraint | None:
    """A Constraint from what the interfaces take: None, a Constraint, or a response_format object as the
    OpenAI API has it ({"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": {...},
    "strict": true}} / {"type": "text"}) or with our own types ({"type": "regex", "regex": "..."},
    {"type": "grammar", "grammar": "..."}). ConstraintError naming `where` and the field."""
    if value is None or isinstance(value, Constraint):
        return value
    if not isinstance(value, dict):
        raise ConstraintError(f"{where}: must be an object with a 'type', got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object(where)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError(f"{where}.json_schema: must be an object with a 'schema' field")
        strict = spec.get("strict", None)
        if strict is not None and not isinstance(strict, bool):
            raise ConstraintError(f"{where}.json_schema.strict: must be true or false, got {strict!r}")
        return json_schema(spec["schema"], f"{where}.json_schema.schema")
    if kind == "regex":
        return regex(value.get("regex"), f"{where}.regex")
    if kind == "grammar":
        return grammar(value.get("grammar"), f"{where}.grammar")
    raise ConstraintError(f"{where}.type: must be one of text, json_object, json_schema, regex, grammar; "
                          f"got {kind!r}")


# Compact JSON (no whitespace between tokens, as json.dumps(separators=(",", ":"))): a model cannot pad the
# answer with whitespace until max_tokens, and the fixed parts (keys, punctuation) are forced, so fast-forward
# takes them. A schema's own "x-guidance" options override it.
JSON_OPTIONS = {"whitespace_flexible": False}

def from_options(json_schema_file=None, regex_pattern: str | None = None, grammar_file=None,
                 json_object_flag: bool = False, max_bytes: int = 1 << 20) -> Constraint | None:
    """The constraint the command-line options give (at most one): a JSON Schema file, a regex, a grammar
    file (Lark or GBNF), or any JSON object. InputError / ConstraintError naming the file or the option."""
    given = [n for n, v in (("--json-schema", json_schema_file), ("--regex", regex_pattern),
                            ("--grammar", grammar_file), ("--json-object", json_object_flag)) if v]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}")
    if json_schema_file is not None:
        return json_schema(_read(json_schema_file, "JSON schema", max_bytes), f"{json_schema_file}")
    if grammar_file is not None:
        return grammar(_read(grammar_file, "grammar", max_bytes), f"{grammar_file}")
    if regex_pattern is not None:
        return regex(regex_pattern, "--regex")
    return json_object("--json-object") if json_object_flag else None


def _read(path, what: str, max_bytes: int) -> str:
    from pathlib import Path

    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise InputError(f"{p}: the {what} is larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: the {what} is not UTF-8 ({e.reason} at byte {e.start})") from None


_GRAMMARS: dict[tuple[str, str], str] = {}


def _grammar(kind: str, text: str, where: str) -> str:
    key = (kind, text)
    if key in _GRAMMARS:
        return _GRAMMARS[key]
    llg = _lib()
    if kind not in KINDS:
        raise ConstraintError(f"{where}: unknown constraint kind {kind!r} (kinds: {', '.join(KINDS)})")
    try:
        if kind == "json_schema":
            g = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        elif kind == "json_object":
            g = llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        elif kind == "regex":
            g = llg.LLMatcher.grammar_from_regex(text)
        else:
            g = llg.grammar_from("grammar", text)
    except ValueError as e:
        raise ConstraintError(f"{where}: {_first_lines(e)}") from None
    bad, messages = llg.LLMatcher.validate_grammar_with_warnings(g)
    if bad:
        what = {"json_schema": "invalid or unsupported JSON schema", "regex": "invalid regex",
                "grammar": "invalid grammar"}.get(kind, "invalid")
        raise ConstraintError(f"{where}: {what}: {_first_lines(messages[0] if messages else '')}")
    if len(_GRAMMARS) > 256:
        _GRAMMARS.clear()
    _GRAMMARS[key] = g
    return g


def _first_lines(msg, n: int = 4) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return " ".join(lines[:n])[:400]


# ----------------------------------------------------------------------------------------------
# the tokenizer and the per-request matcher
# ----------------------------------------------------------------------------------------------


class _Vocab:
    """What llguidance's TokenizerWrapper reads: every token's bytes (special tokens as 0xff + their text,
    so that no text can produce them), the EOS ids, and the model's own tokenize."""

    def __init__(self, backend):
        texts = backend.token_texts()
        eos = sorted(backend.eos_ids)
        self.tokens = []
        self.special_token_ids = []
        for i in range(backend.vocab_size):
            b = backend.token_bytes(i)
            t = texts[i] if i < len(texts) else ""
            if not b and t:  # a control token (BOS, EOS, chat markers): bytes b"" from the backends
                b = b"\xff" + t.encode("utf-8")
                self.special_token_ids.append(i)
            self.tokens.append(b)
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = backend.bos_id
        self._tokenize = backend.tokenize

    def __call__(self, s) -> list[int]:
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        return list(self._tokenize(s, special=False, add_bos=False))


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_for(backend):
    """The llguidance tokenizer of a backend's vocabulary (built once per backend: a pass over the vocabulary)."""
    tok = _TOKENIZERS.get(backend)
    if tok is None:
        llg = _lib()
        v = _Vocab(backend)
        if v.eos_token_id is None:
            raise UnsupportedError(f"{backend.path}: the model has no EOS token; a constrained answer could not end")
        tok = llg.LLTokenizer(llg.TokenizerWrapper(v), n_vocab=backend.vocab_size, eos_token=sorted(backend.eos_ids))
        _TOKENIZERS[backend] = tok
    return tok


_TEMPLATES: dict = {}


class Matcher:
    """One request's constraint state over a backend's vocabulary (the expert's)."""

    def __init__(self, constraint: Constraint, backend):
        llg = _lib()
        self.constraint = constraint
        tok = tokenizer_for(backend)
        key = (id(tok), constraint.kind, constraint.text)
        template = _TEMPLATES.get(key)
        if template is None or template[0] is not tok:
            m = llg.LLMatcher(tok, constraint.grammar(), log_level=0)
            if m.is_error():
                raise ConstraintError(f"{constraint.where}: {_first_lines(m.get_error())}")
            if len(_TEMPLATES) > 64:
                _TEMPLATES.clear()
            _TEMPLATES[key] = template = (tok, m)
        self._m = template[1].deep_copy()
        self.vocab_size = backend.vocab_size
        self.eos_ids = backend.eos_ids
        self._mask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)  # (ceil(V / 32),) bits

    def allowed(self) -> np.ndarray:
        """Token ids (K,) int64 the constraint allows next, ascending (EOS ids where the answer may end)."""
        m = self._m
        m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        self._check()
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[:self.vocab_size]  # (V,)
        return bits.nonzero()[0]

    def forced_run(self) -> list[int]:
        """The tokens the constraint forces next, as the library tokenizes the forced text ([] when none)."""
        if self._m.is_stopped():
            return []
        run = self._m.compute_ff_tokens()
        self._check()
        return list(run)

    def consume(self, tokens) -> None:
        tokens = [int(t) for t in tokens]
        if tokens and tokens[-1] in self.eos_ids and self._m.is_accepting():
            tokens = tokens[:-1]  # the answer ends here: the matcher (stopped once complete) is not fed EOS
        if tokens and not self._m.consume_tokens(tokens):
            self._check()
            raise ConstraintError(f"{self.constraint.where}: the constraint refused token(s) {list(tokens)}")

    @property
    def complete(self) -> bool:
        """Whether the text so far matches the whole constraint (the answer may end here)."""
        return bool(self._m.is_accepting())

    def _check(self) -> None:
        if self._m.is_error():
            raise ConstraintError(f"{self.constraint.where}: {_first_lines(self._m.get_error())}")


def clear_caches() -> None:
    """Forget the checked grammars, tokenizers and compiled matchers (bench/constrain.py times the compile)."""
    _GRAMMARS.clear()
    _TEMPLATES.clear()
    _TOKENIZERS.clear()


def forced_token(x: np.ndarray, allowed: np.ndarray, eos_ids) -> int | None:
    """The token emitted without a pick, or None: the one allowed token, or, where the constraint is complete
    and allows only the end (several EOS / end-of-turn ids), the expert's likeliest of them (whichever ends
    the answer the same way: no amateur is needed to choose). x (V,), allowed (A,) ascending."""
    if len(allowed) == 1:
        return int(allowed[0])
    if len(allowed) <= len(eos_ids) and all(int(t) in eos_ids for t in allowed):
        return int(allowed[int(np.argmax(x[allowed]))])
    return None


def candidates(x: np.ndarray, allowed: np.ndarray, alpha: float) -> np.ndarray:
    """The plausibility mask on the expert's distribution renormalised over the allowed tokens.
    x (V,) expert logits, allowed (A,) ascending ids -> (K,) ascending ids (never empty when A > 0)."""
    xa = x[allowed]  # (A,)
    return allowed[xa >= xa.max() + math.log(alpha)]
