"""Evaluation data, answer extraction and statistics: pure functions, no engine.

    items = load_items("test.jsonl")                  # [Item(id, prompt, messages, answer)]
    extract = make_extractor("last-number")           # text -> extracted answer or None
    ok = is_correct(extract(text), item.answer, "last-number")
    lo, hi = wilson(k, n)                             # 95% interval of an accuracy
    p = mcnemar_exact(b, c)                           # paired test of two methods on the same items
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError, ParameterError

# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str | None  # a user message, or None when `messages` is given
    messages: list[dict] | None  # a chat (role/content dicts) ending with a user turn
    answer: str

    @property
    def text(self) -> str:
        """The question as one line of text (for reports)."""
        if self.prompt is not None:
            return self.prompt
        return str(self.messages[-1].get("content", "")) if self.messages else ""

    def chat(self) -> list[dict]:
        """The item as chat messages: a `prompt` is one user turn."""
        return list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]


def parse_item(obj, where: str, index: int) -> Item:
    """One JSON object -> Item; InputError naming `where` (file and line) on anything missing."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise InputError(f"{where}: no 'prompt' or 'messages' field")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be a string")
    if messages is not None and (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if "answer" not in obj or obj["answer"] is None:
        raise InputError(f"{where}: no 'answer' field")
    answer = obj["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"{where}: 'answer' must be a non-empty string or a number")
    return Item(id=str(obj.get("id", index)), prompt=prompt if messages is None else None,
                messages=messages, answer=answer.strip())


def load_items(path, limit: int | None = None) -> list[Item]:
    """Read a JSONL file of {"id", "prompt"|"messages", "answer"}; blank lines are skipped.

    InputError (one line, with the line number) on a missing file, bad JSON, missing fields, duplicate
    ids or no items at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    items, ids = [], set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise InputError(f"{where}: invalid JSON (nested too deeply)") from None
            item = parse_item(obj, where, len(items))
            if item.id in ids:
                raise InputError(f"{where}: duplicate id {item.id!r}")
            ids.add(item.id)
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise InputError(f"{path}: no items (empty data file)")
    return items


# ---------------------------------------------------------------------------------------------- extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CHOICE = re.compile(r"\b([A-J])\b")
_CHOICE_MARKED = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\b|\(([A-J])\)", re.IGNORECASE)
EXTRACT_MODES = ("last-number", "exact", "regex:PATTERN", "choice", "json:FIELD")

Extractor = Callable[[str], "str | None"]


def last_number(text: str) -> str | None:
    """The last number in the text ("1,234" -> "1234", trailing ".0" kept for `numbers_equal`)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def exact(text: str) -> str | None:
    """The whole output, whitespace-collapsed, without a trailing period."""
    s = " ".join(text.split()).rstrip(".").strip()
    return s or None


def choice(text: str) -> str | None:
    """A multiple-choice letter A-J: the last marked one ("Answer: B", "(C)"), else the last lone capital."""
    marked = _CHOICE_MARKED.findall(text)
    if marked:
        a, b = marked[-1]
        return (a or b).upper()
    lone = _CHOICE.findall(text)
    return lone[-1] if lone else None


def regex_extractor(pattern: str) -> Extractor:
    """The last match of PATTERN; its first group when it has one."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ParameterError(f"extract regex {pattern!r} is invalid: {e}") from None

    def extract(text: str) -> str | None:
        matches = list(rx.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        got = m.group(1) if rx.groups else m.group(0)
        return got.strip() if got is not None else None

    return extract


def json_extractor(path: str) -> Extractor:
    """The field at PATH (dot-separated keys, list indices as numbers: `answer`, `result.value`, `items.0`)
    of the output parsed as JSON (a constrained answer, e.g. --json-schema with an `answer` field); None when
    the output is not JSON or has no such field. Strings as they are, numbers and booleans as JSON writes them."""
    keys = path.split(".")
    if not all(keys):
        raise ParameterError(f"extract 'json:{path}': empty key in the field path (keys separated by '.')")

    def extract(text: str) -> str | None:
        try:
            v = json.loads(text)
        except (ValueError, RecursionError):
            return None
        for k in keys:
            if isinstance(v, dict) and k in v:
                v = v[k]
            elif isinstance(v, list) and k.isdigit() and int(k) < len(v):
                v = v[int(k)]
            else:
                return None
        if v is None or isinstance(v, (dict, list)):
            return None if v is None else json.dumps(v, ensure_ascii=False)
        return v.strip() if isinstance(v, str) else json.dumps(v)

    return extract


def make_extractor(spec: str) -> Extractor:
    """`last-number`, `exact`, `choice`, `regex:PATTERN` or `json:FIELD` -> a function text -> answer (or None)."""
    if spec == "last-number":
        return last_number
    if spec == "exact":
        return exact
    if spec == "choice":
        return choice
    if spec.startswith("regex:"):
        if not spec[6:]:
            raise ParameterError("extract 'regex:' needs a pattern, e.g. regex:Answer: (\\S+)")
        return regex_extractor(spec[6:])
    if spec.startswith("json:"):
        if not spec[5:]:
            raise ParameterError("extract 'json:' needs a field, e.g. json:answer")
        return json_extractor(spec[5:])
    raise ParameterError(f"extract {spec!r} is not one of {', '.join(EXTRACT_MODES)}")


def numbers_equal(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a.replace(",", "")), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


def is_correct(extracted: str | None, answer: str, spec: str) -> bool:
    """Compare an extracted answer with the gold one the way the extraction mode implies."""
    if extracted is None:
        return False
    if spec == "last-number":
        gold = last_number(answer)
        return gold is not None and numbers_equal(extracted, gold)
    if spec == "choice":
        return extracted.upper() == answer.strip().strip("()").upper()
    if spec == "exact":
        return extracted == exact(answer)
    if spec.startswith("json:") and last_number(extracted) == extracted and last_number(answer.strip()) == answer.strip():
        return numbers_equal(extracted, answer)  # 42 and 42.0, as a JSON number may be written
    return extracted.strip() == answer.strip()


# ---------------------------------------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def discordant(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(items only `a` got right, items only `b` got right)."""
    if len(a) != len(b):
        raise ValueError("paired results must have the same length")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test (binomial on the discordant pairs b, c): two-sided p-value."""
    return binom_two_sided(b, b + c)


def paired_bootstrap(a: list[bool], b: list[bool], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean of b - a, 2.5th and 97.5th percentile of the resampled difference), items resampled in pairs."""
    if len(a) != len(b) or not a:
        raise ValueError("paired results must be non-empty and of the same length")
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n, rng = len(d), random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return sum(d) / n, means[int(0.025 * (n_boot - 1))], means[int(0.975 * (n_boot - 1))]


def half_width(n: int, p: float = 0.5) -> float:
    """Half-width of the 95% Wilson interval for n items at accuracy p (how finely n items resolve)."""
    lo, hi = wilson(round(p * n), n)
    return (hi - lo) / 2


def too_small_warning(n: int, what: str = "data set", min_items: int = 100) -> str | None:
    """A warning when n items cannot tell methods apart by a few points, else None."""
    if n >= min_items:
        return None
    return (f"{what} has only {n} items: accuracies are known to about +/-{100 * half_width(n):.0f} points "
            f"(95%); differences of a few points between methods will be noise (use {min_items}+ items)")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_two_sided(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Paired t-test of b against a over runs (e.g. accuracies per sampling seed, as the paper compares
    10 runs): (mean of b - a, t statistic, two-sided p). Needs 2+ pairs; identical pairs give (0, 0, 1)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired t-test needs two or more pairs of the same length")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    if var == 0.0:
        return mean, (0.0 if mean == 0 else math.copysign(math.inf, mean)), (1.0 if mean == 0 else 0.0)
    t = mean / math.sqrt(var / n)
    return mean, t, t_two_sided(t, n - 1)


def render_table(head: list[str], body: list[list[str]], markdown: bool = False) -> str:
    """Rows of cells as aligned text (terminal) or as a Markdown table."""
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
