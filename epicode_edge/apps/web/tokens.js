/* The answer-with-changed-picks component shared by the chat page (chat.html) and eval's report.html.

   Each token is the JSON of decoding/explain.py (explain_json): {text, token, token_text, changed, skipped,
   own, own_text, logprob, n_candidates, candidates: [{id, text, expert_logprob, amateur_logprob, score,
   picked}], top_logprobs?}. Tokens whose pick contrastive decoding changed get the class ep-changed; hovering,
   focusing or tapping a token opens its candidate view (one shared popover).

     const ans = new EpicodeTokens.Answer(element);   // ans.add(tok), ans.addText(text), ans.counts()
     EpicodeTokens.attach(document.body);              // once: the popover and its events
*/
(function (global) {
  "use strict";

  function pct(lp) {
    if (lp === null || lp === undefined) return "\u2013";
    const p = 100 * Math.exp(lp);
    return (p >= 10 ? p.toFixed(1) : p >= 0.01 ? p.toFixed(2) : p.toExponential(1)) + "%";
  }

  function num(x) { return x === null || x === undefined ? "\u2013" : x.toFixed(2); }

  function shown(text) {  // a token's text with whitespace made visible
    const s = JSON.stringify(String(text));
    return s.slice(1, -1) || "\u2205";
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function tokenSpan(tok, i) {
    const span = el("span", "ep-tok" + (tok.changed ? " ep-changed" : "") + (tok.skipped ? " ep-skipped" : ""));
    span.textContent = tok.text !== undefined ? tok.text : tok.token_text;
    if (tok.candidates) {
      span.dataset.i = String(i);
      span.tabIndex = 0;
      span.setAttribute("role", "button");
      span.setAttribute("aria-label", (tok.changed ? "changed pick " : "token ") + shown(tok.token_text));
      span.__ep = tok;
    }
    return span;
  }

  /* The candidate view of one token: what won, what the expert alone would have picked, the table. */
  function candidatesView(tok) {
    const box = el("div");
    const head = el("div", "ep-head");
    head.append("Picked ", el("code", null, shown(tok.token_text)));
    if (tok.changed) {
      head.append(" \u2014 changed by contrastive decoding (the expert alone: ",
                  el("code", null, shown(tok.own_text)), ")");
    } else {
      head.append(" \u2014 the expert's own pick");
    }
    box.append(head);
    const table = el("table", "ep-cands");
    const hr = el("tr");
    for (const h of ["candidate", "expert p", "amateur p", "score", ""]) hr.append(el("th", null, h));
    const thead = el("thead");
    thead.append(hr);
    table.append(thead);
    const body = el("tbody");
    for (const c of tok.candidates) {
      const tr = el("tr", (c.picked ? "ep-picked" : "") + (c.id === tok.own ? " ep-own" : ""));
      const name = el("td");
      name.append(el("code", null, shown(c.text)));
      tr.append(name, el("td", null, pct(c.expert_logprob)), el("td", null, pct(c.amateur_logprob)),
                el("td", null, num(c.score)), el("td", "ep-winner", c.picked ? "\u2713 winner" : ""));
      body.append(tr);
    }
    table.append(body);
    box.append(table);
    const notes = [];
    if (tok.skipped) notes.push(tok.n_candidates === 1
      ? "One plausible candidate: the amateur was not run for this step."
      : "The amateur was not run for this step.");
    if (tok.n_candidates > tok.candidates.length) {
      notes.push(`${tok.candidates.length} of ${tok.n_candidates} plausible candidates shown.`);
    }
    notes.push("p: probability over the whole vocabulary. score = (1 + \u03bb) log p(expert) \u2212 \u03bb log p(amateur), " +
               "on the candidates the plausibility mask kept.");
    for (const n of notes) box.append(el("div", "ep-note", n));
    return box;
  }

  let pop = null, current = null, pinned = false;

  function show(span) {
    if (!pop) return;
    if (current && current !== span) current.classList.remove("ep-open");
    current = span;
    span.classList.add("ep-open");
    pop.replaceChildren(candidatesView(span.__ep));
    pop.hidden = false;
    const r = span.getBoundingClientRect();
    const w = pop.offsetWidth, h = pop.offsetHeight;
    let left = window.scrollX + Math.min(Math.max(4, r.left), document.documentElement.clientWidth - w - 4);
    let top = window.scrollY + r.bottom + 6;
    if (r.bottom + h + 8 > window.innerHeight && r.top > h + 8) top = window.scrollY + r.top - h - 6;
    pop.style.left = left + "px";
    pop.style.top = top + "px";
  }

  function hide() {
    if (!pop) return;
    pop.hidden = true;
    pinned = false;
    if (current) current.classList.remove("ep-open");
    current = null;
  }

  function target(e) {
    const t = e.target instanceof Element ? e.target.closest(".ep-tok[data-i]") : null;
    return t && t.__ep ? t : null;
  }

  /* The popover and its events, once per page (event delegation: tokens added later work too). */
  function attach(root) {
    if (pop) return;
    pop = el("div", "ep-pop");
    pop.hidden = true;
    pop.setAttribute("role", "dialog");
    pop.setAttribute("aria-label", "candidates");
    document.body.append(pop);
    root.addEventListener("mouseover", (e) => { const t = target(e); if (t && !pinned) show(t); });
    root.addEventListener("mouseout", (e) => {
      const t = target(e);
      if (t && !pinned && !(e.relatedTarget && pop.contains(e.relatedTarget))) hide();
    });
    root.addEventListener("click", (e) => {
      const t = target(e);
      if (t) {
        if (pinned && current === t) { hide(); return; }
        show(t);
        pinned = true;
        e.stopPropagation();
      } else if (pinned && !pop.contains(e.target)) {
        hide();
      }
    });
    root.addEventListener("focusin", (e) => { const t = target(e); if (t) show(t); });
    root.addEventListener("keydown", (e) => {
      if (e.key === "Escape") hide();
      const t = target(e);
      if (t && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); show(t); pinned = true; }
    });
  }

  /* One answer: tokens (with their data) and plain text (a held tail), and its counts. */
  class Answer {
    constructor(element) {
      this.el = element;
      this.el.classList.add("ep-answer");
      this.tokens = [];
      this.text = "";
    }
    add(tok) {
      this.el.append(tokenSpan(tok, this.tokens.length));
      this.tokens.push(tok);
      this.text += tok.text || "";
    }
    addText(text) {
      if (!text) return;
      this.el.append(document.createTextNode(text));
      this.text += text;
    }
    counts() {
      const t = this.tokens;
      return {tokens: t.length, changed: t.filter((x) => x.changed).length,
              skipped: t.filter((x) => x.skipped).length};
    }
  }

  /* Render a whole answer (a list of tokens, then an optional tail) into element. */
  function render(element, tokens, tail) {
    const a = new Answer(element);
    for (const t of tokens) a.add(t);
    a.addText(tail || "");
    return a;
  }

  global.EpicodeTokens = {Answer, attach, render, candidatesView, tokenSpan, pct};
})(window);
