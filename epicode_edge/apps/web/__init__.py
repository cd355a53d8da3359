"""The browser pages: plain HTML, CSS and JavaScript files in this folder; no build step, no CDN, nothing
fetched from another address.

    chat.html               the chat page `serve` shows at / (apps/serve.py)
    report.html             eval's OUT/report.html (apps/eval.py), its data inlined
    tokens.js, tokens.css   the answer-with-changed-picks component both use

    html = page("report.html", data={...})   # one self-contained document: local CSS/JS and the data inlined
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_MARK = "/*EPICODE_DATA*/null"  # where page(data=...) puts the page's JSON
_LINK = re.compile(r'<link rel="stylesheet" href="([\w.-]+)">')
_SCRIPT = re.compile(r'<script src="([\w.-]+)"></script>')


def asset(name: str) -> str:
    """The text of one file of this folder."""
    return (HERE / name).read_text(encoding="utf-8")


def page(name: str, data=None) -> str:
    """The page with its local stylesheets and scripts inlined, and with data (JSON-ready) in place of
    DATA_MARK: a document that needs nothing else."""
    html = asset(name)
    html = _LINK.sub(lambda m: f"<style>\n{asset(m[1])}</style>", html)
    html = _SCRIPT.sub(lambda m: f"<script>\n{asset(m[1])}</script>", html)
    if data is not None:
        html = html.replace(DATA_MARK, script_json(data), 1)
    return html


def script_json(data) -> str:
    """JSON that is safe inside a <script> element (no '</script>', no '<!--'); NaN and infinities become
    null (JSON.parse takes no others)."""
    return (json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
