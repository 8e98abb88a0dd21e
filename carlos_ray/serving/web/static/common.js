// Shared helpers of the carlos-ray pages. Every piece of index data is untrusted text: it only ever
// reaches the page through textContent / createTextNode or a validated attribute, never as HTML.
"use strict";

const CR = (function () {
  const QUADRANTS = {
    focused: { colour: "#1b9e77", rule: "strength ≤ max, consistency ≥ min", words: "a moderate, directed effect (kept by the default filter)" },
    overpowering: { colour: "#d95f02", rule: "strength > max, consistency ≥ min", words: "consistently takes over the image" },
    chaotic: { colour: "#7570b3", rule: "strength > max, consistency < min", words: "changes a lot, in no consistent direction" },
    erratic: { colour: "#808080", rule: "strength ≤ max, consistency < min", words: "small changes in no consistent direction" },
    undefined: { colour: "#000000", rule: "strength or consistency not finite, or no thresholds", words: "cannot be placed" },
  };

  /** Create an element; attrs are set with setAttribute (never on*), children are nodes or text. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (/^on/i.test(k)) throw new Error("event handler attributes are not allowed: " + k);
      node.setAttribute(k, String(v));
    }
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (/^on/i.test(k)) throw new Error("event handler attributes are not allowed: " + k);
      node.setAttribute(k, String(v));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  /** The API root: every page lives at the service's root, so "." is it (also under a route prefix). */
  function apiUrl(path, params) {
    const url = new URL(path, document.baseURI);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined) url.searchParams.set(k, String(v));
    }
    return url;
  }

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
    }
  }

  async function getJson(path, params) {
    let response;
    try {
      response = await fetch(apiUrl(path, params), { headers: { Accept: "application/json" } });
    } catch (e) {
      throw new ApiError(0, "network", "The server did not answer (" + e.message + "). Is the service still running?");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : "request failed with HTTP " + response.status;
      throw new ApiError(response.status, body && body.error ? String(body.error) : "http_" + response.status, detail);
    }
    return body;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "n/a";
    return Number(x).toPrecision(digits || 3).replace(/\.?0+(e|$)/, "$1");
  }

  function loraHref(id) {
    return "lora?id=" + encodeURIComponent(id);
  }

  function likeHref(id) {
    return "./?like=" + encodeURIComponent(id);
  }

  /** Only http(s) links from metadata become links; anything else (javascript:, data:) stays text. */
  function safeHttpUrl(text) {
    try {
      const u = new URL(String(text));
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function show(node, text) {
    node.textContent = text;
    node.hidden = !text;
  }

  function quadrantBadge(q) {
    const info = QUADRANTS[q] || QUADRANTS.undefined;
    const badge = el("span", { class: "badge q-" + (QUADRANTS[q] ? q : "undefined"), title: info.rule + ": " + info.words }, q);
    return badge;
  }

  /** "3.2 ≤ 9.8 ✓" style comparison of a value against a threshold. */
  function against(value, threshold, op) {
    if (value === null || value === undefined) return "n/a";
    if (threshold === null || threshold === undefined) return fmt(value);
    const ok = op === "<=" ? value <= threshold : value >= threshold;
    return fmt(value) + " " + (op === "<=" ? "≤" : "≥") + " " + fmt(threshold) + (ok ? " ✓" : " ✗");
  }

  function chips(words, cls) {
    return el("ul", { class: "chips " + (cls || "") }, (words || []).map((w) => el("li", {}, String(w))));
  }

  return { QUADRANTS, el, svg, append, clear, apiUrl, getJson, ApiError, fmt, loraHref, likeHref, safeHttpUrl, show,
           quadrantBadge, against, chips };
})();
