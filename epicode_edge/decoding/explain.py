"""Per-token explanations of contrastive decoding: the pick, the expert's own pick, the plausible candidates
with both models' log-probabilities and their contrastive scores, and the expert's top log-probabilities.

    exp = explain_pick(x, y, ids, lam, token, own, top_logprobs=5)    # one pick -> Explain
    explain_json(exp, vocab, text)                                     # the JSON of one token (CLI, server)
    openai_logprob(exp, vocab)                                         # OpenAI's logprobs.content[i]

The loops compute it only when asked (`explain=True` in decoding/loop.py and decoding/batch_loop.py; the
runtime's Settings.explain); off, no function here runs. What the numbers are:

    expert_logprobs[k]   log_softmax(expert logits)[ids[k]], over the whole vocabulary
    amateur_logprobs[k]  log_softmax(amateur logits)[ids[k]], over the whole vocabulary, or None when the pick
                         read no amateur logits (`skipped`: a forced pick, or lambda 0, in the lazy loop): the
                         amateur's numbers are never guessed from an older position
    scores[k]            (1 + lam) * expert_logprobs[k] - lam * amateur_logprobs[k]: the paper's contrastive
                         scores (decoding/contrastive.py, contrastive_scores, on the kept tokens); with lam == 0
                         the expert's log-probs; None when lam > 0 and the amateur was not read
    logprob, top_logprobs  the expert's (OpenAI's logprobs: the model that speaks is the expert)

The loop's own scores use raw logits (candidate_scores with normalize=False), which differ from these by one
constant for all candidates: the same ranking and the same picks. The candidate head gives the amateur's raw
logits of the K candidates only, which have no log-normaliser; so with explain on the loops read the
amateur's whole output layer (llama.cpp computes it anyway; MLX then runs its whole output layer). A
repetition penalty, when set, is applied to the scores before the pick and is not in `scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from .contrastive import logsumexp

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


def check_top_logprobs(n) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise ParameterError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {n!r}")
    return int(n)


@dataclass
class Explain:
    """What contrastive decoding did at one pick (see the module docstring for the numbers)."""

    token: int                              # the pick
    own: int                                # the expert's own pick (same settings, same random draw)
    skipped: bool                           # no amateur logits were read for this pick
    logprob: float                          # the expert's log-prob of the pick
    candidates: list[int]                   # (K,) the ids the plausibility mask kept, ascending
    expert_logprobs: list[float]            # (K,)
    amateur_logprobs: list[float] | None    # (K,) or None (skipped)
    scores: list[float] | None              # (K,) or None (lam > 0 and skipped)
    top_logprobs: list[tuple[int, float]]   # the expert's most likely tokens, (id, log-prob), most likely first

    @property
    def changed(self) -> bool:
        return self.token != self.own


def explain_pick(x: np.ndarray, y: np.ndarray | None, ids: np.ndarray, lam: float, token: int, own: int,
                 top_logprobs: int = 0) -> Explain:
    """The Explain of one pick. x: (V,) expert logits; y: (V,) amateur logits of the same position, or None
    when the pick did not read them; ids: (K,) the plausible candidates; token, own: the contrastive and the
    expert's own pick."""
    x = np.asarray(x, dtype=np.float32)
    lse = logsumexp(x)  # log_softmax(x)[i] == x[i] - lse, read only where needed
    e = x[ids] - lse  # (K,)
    a = s = None
    if y is not None:
        y = np.asarray(y, dtype=np.float32)
        a = y[ids] - logsumexp(y)  # (K,)
        s = (1 + lam) * e - lam * a
    elif lam == 0:
        s = e
    top = []
    if top_logprobs:
        n = min(top_logprobs, x.shape[0])
        idx = np.argpartition(x, x.shape[0] - n)[x.shape[0] - n:]  # (n,) the n largest, unordered
        idx = idx[np.lexsort((idx, -x[idx]))]  # most likely first, ties by id
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return Explain(int(token), int(own), y is None, float(x[token] - lse), ids.tolist(), e.tolist(),
                   None if a is None else a.tolist(), None if s is None else s.tolist(), top)


def _text(vocab, token: int) -> str:
    return vocab.token_bytes(token).decode("utf-8", errors="replace")


def explain_json(exp: Explain, vocab, text: str | None = None, max_candidates: int = 20) -> dict:
    """One token's explanation as JSON-ready data. text: what the stream emitted with this token (may be ""
    while bytes of a character are held); token_text is the token's own bytes as UTF-8. Candidates are
    listed best score first (expert log-prob first when there are no scores), at most max_candidates of
    them (n_candidates says how many the mask kept)."""
    k = len(exp.candidates)
    key = exp.scores if exp.scores is not None else exp.expert_logprobs
    order = sorted(range(k), key=lambda j: (-key[j], exp.candidates[j]))[:max_candidates]
    cands = []
    for j in order:
        t = exp.candidates[j]
        cands.append({"id": t, "text": _text(vocab, t), "expert_logprob": exp.expert_logprobs[j],
                      "amateur_logprob": None if exp.amateur_logprobs is None else exp.amateur_logprobs[j],
                      "score": None if exp.scores is None else exp.scores[j], "picked": t == exp.token})
    out = {"token": exp.token, "token_text": _text(vocab, exp.token), "changed": exp.changed,
           "skipped": exp.skipped, "own": exp.own, "own_text": _text(vocab, exp.own), "logprob": exp.logprob,
           "n_candidates": k, "candidates": cands}
    if text is not None:
        out = {"text": text, **out}
    if exp.top_logprobs:
        out["top_logprobs"] = [{"id": t, "text": _text(vocab, t), "logprob": lp} for t, lp in exp.top_logprobs]
    return out


def openai_logprob(exp: Explain, vocab) -> dict:
    """The expert's log-probs of one token in OpenAI's shape (an entry of choices[0].logprobs.content)."""
    def entry(t: int, lp: float) -> dict:
        b = vocab.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {**entry(exp.token, exp.logprob), "top_logprobs": [entry(t, lp) for t, lp in exp.top_logprobs]}
