// The search page: a text query (or "more like this") ranked under the strength and consistency filters.
"use strict";

(function () {
  const { el, clear, getJson, fmt, loraHref, likeHref, show, quadrantBadge, against, chips } = CR;
  const $ = (id) => document.getElementById(id);
  const K = 12;
  const BROWSE_MAX = 60;
  const state = {
    index: null, points: new Map(), all: [], thresholds: {}, maxStrength: null, minConsistency: null,
    strengthOff: false, consistencyOff: false, mode: null, query: "", like: null, seq: 0, firstResults: null,
  };

  function niceTop(x) {
    if (!(x > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    return Math.ceil(x / p * 2) / 2 * p;
  }

  function setupSlider(input, top, value) {
    input.min = "0";
    input.max = String(top);
    input.step = String(top / 1000);
    input.value = String(value);
  }

  function initFilters() {
    const th = state.thresholds;
    const finite = (xs) => xs.filter((x) => x !== null && Number.isFinite(x));
    const strengths = finite(state.all.map((p) => p.strength));
    const cons = finite(state.all.map((p) => p.consistency));
    const sTop = niceTop(Math.max(th.max_strength || 0, ...strengths) * 1.1);
    const cTop = Math.min(1, niceTop(Math.max(th.min_consistency || 0, ...cons) * 1.2));
    state.maxStrength = th.max_strength !== null && th.max_strength !== undefined ? th.max_strength : sTop;
    state.minConsistency = th.min_consistency !== null && th.min_consistency !== undefined ? th.min_consistency : 0;
    state.strengthOff = th.max_strength === null || th.max_strength === undefined;
    state.consistencyOff = false;
    setupSlider($("max-strength"), sTop, state.maxStrength);
    setupSlider($("min-consistency"), cTop, state.minConsistency);
    $("strength-off").checked = state.strengthOff;
    $("consistency-off").checked = state.consistencyOff;
  }

  function effective() {
    return {
      ms: state.strengthOff ? Infinity : state.maxStrength,
      mc: state.consistencyOff ? 0 : state.minConsistency,
    };
  }

  function kept(p, ms, mc) {
    return p.strength !== null && p.consistency !== null && p.strength <= ms && p.consistency >= mc;
  }

  function describeFilters() {
    const th = state.thresholds;
    const { ms, mc } = effective();
    const n = state.all.length;
    const sKeep = state.all.filter((p) => p.strength !== null && p.strength <= ms).length;
    const cKeep = state.all.filter((p) => p.consistency !== null && p.consistency >= mc).length;
    const both = state.all.filter((p) => kept(p, ms, mc)).length;
    $("max-strength-value").textContent = state.strengthOff ? "(off)" : fmt(state.maxStrength, 4);
    $("min-consistency-value").textContent = state.consistencyOff ? "(off: ≥ 0)" : fmt(state.minConsistency, 4);
    $("max-strength").disabled = state.strengthOff;
    $("min-consistency").disabled = state.consistencyOff;
    const atS = !state.strengthOff && state.maxStrength === th.max_strength;
    const atC = !state.consistencyOff && state.minConsistency === th.min_consistency;
    $("strength-keeps").textContent = state.strengthOff
      ? "No strength filter: overpowering and chaotic LoRAs (strength above " + fmt(th.max_strength, 4) + ") are kept too. " + sKeep + " of " + n + " LoRAs."
      : "Keeps the subtle side, strength ≤ " + fmt(state.maxStrength, 4) + (atS ? " (the index's threshold)" : " (index threshold " + fmt(th.max_strength, 4) + ")") +
        ": the focused and erratic quadrants. " + sKeep + " of " + n + " LoRAs.";
    $("consistency-keeps").textContent = state.consistencyOff
      ? "No consistency filter: erratic and chaotic LoRAs are kept too. " + cKeep + " of " + n + " LoRAs."
      : "Keeps the consistent side, consistency ≥ " + fmt(state.minConsistency, 4) + (atC ? " (the index's threshold)" : " (index threshold " + fmt(th.min_consistency, 4) + ")") +
        ": the focused and overpowering quadrants. " + cKeep + " of " + n + " LoRAs.";
    $("filter-summary").textContent = "Together the filters keep " + both + " of " + n + " LoRAs" +
      (atS && atC ? ": exactly the focused quadrant." : ".");
  }

  function params() {
    const { ms, mc } = effective();
    return { k: K, max_strength: ms === Infinity ? "inf" : ms, min_consistency: mc };
  }

  function card(hit) {
    const p = state.points.get(hit.lora_id) || {};
    const th = state.thresholds;
    const name = hit.name || p.name || hit.lora_id;
    const body = el("div", { class: "card-body" },
      el("h3", {}, el("a", { href: loraHref(hit.lora_id), class: "name" }, name)),
      el("p", { class: "meta" },
        hit.score !== undefined ? el("span", { class: "score", title: "cosine of the query and LoRA directions" }, "score " + fmt(hit.score, 3)) : null,
        quadrantBadge(p.quadrant || "undefined")),
      el("p", { class: "sc" },
        el("span", {}, "strength " + against(hit.strength, th.max_strength, "<=")),
        el("span", {}, "consistency " + against(hit.consistency, th.min_consistency, ">="))),
      (hit.trigger_words || []).length ? chips(hit.trigger_words, "triggers") : null,
      hit.description ? el("p", { class: "desc" }, String(hit.description).slice(0, 240)) : null,
      el("p", { class: "links" },
        el("a", { href: likeHref(hit.lora_id), class: "more-like-this" }, "more like this"),
        el("a", { href: loraHref(hit.lora_id), class: "details" }, "details")));
    const node = el("article", { class: "card", "data-lora-id": hit.lora_id });
    if (p.thumbnails) {
      node.appendChild(el("img", { class: "thumb", src: "loras/" + encodeURIComponent(hit.lora_id) + "/thumbnails",
                                   alt: "base (top) vs LoRA (bottom)" }));
    }
    node.appendChild(body);
    return node;
  }

  function render(hits, title, empty) {
    $("results-title").textContent = title;
    const box = clear($("results"));
    hits.forEach((h) => box.appendChild(card(h)));
    show($("status"), hits.length ? hits.length + " result" + (hits.length === 1 ? "" : "s") + "." : empty);
    if (state.firstResults === null && hits.length) {
      state.firstResults = performance.now();
      window.crTimings = { firstResultsMs: state.firstResults };
    }
    document.body.setAttribute("data-state", "ready");
  }

  function fail(e) {
    clear($("results"));
    $("results-title").textContent = "";
    show($("status"), "");
    show($("error"), e.message);
    document.body.setAttribute("data-state", "error");
  }

  async function run() {
    const seq = ++state.seq;
    show($("error"), "");
    describeFilters();
    document.body.setAttribute("data-state", "loading");
    try {
      if (state.mode === "search") {
        if (!state.index.search_available) {
          throw new Error("Text search is unavailable on this server: " + state.index.search_unavailable_reason +
                          ". You can still browse the LoRAs, open their details and use “more like this”.");
        }
        const out = await getJson("search", { q: state.query, ...params() });
        if (seq !== state.seq) return;
        render(out.hits, "Results for “" + out.query + "”", "No LoRA passes the filters for this query. Loosen the filters above.");
      } else if (state.mode === "like") {
        const out = await getJson("loras/" + encodeURIComponent(state.like) + "/similar", params());
        if (seq !== state.seq) return;
        const p = state.points.get(state.like);
        render(out.hits, "LoRAs that act like “" + ((p && p.name) || state.like) + "”", "No other LoRA passes the filters. Loosen the filters above.");
      } else {
        const { ms, mc } = effective();
        const rows = state.all.filter((p) => kept(p, ms, mc)).slice(0, BROWSE_MAX);
        if (seq !== state.seq) return;
        render(rows, "LoRAs passing the filters (by name)", "No LoRA passes the filters.");
      }
    } catch (e) {
      if (seq === state.seq) fail(e);
    }
  }

  function writeUrl() {
    const url = new URL("./", document.baseURI);
    if (state.mode === "search") url.searchParams.set("q", state.query);
    if (state.mode === "like") url.searchParams.set("like", state.like);
    history.replaceState(null, "", url.pathname + url.search);
  }

  let timer = null;
  function rerunSoon() {
    document.body.setAttribute("data-state", "loading");
    describeFilters();
    clearTimeout(timer);
    timer = setTimeout(run, 120);
  }

  function wire() {
    $("search-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const q = $("q").value.trim();
      if (!q) {
        state.seq++;
        clear($("results"));
        $("results-title").textContent = "";
        show($("status"), "");
        show($("error"), "Type a few words to search for, for example “watercolor” or “neon city at night”.");
        document.body.setAttribute("data-state", "error");
        return;
      }
      state.mode = "search";
      state.query = q;
      writeUrl();
      run();
    });
    $("max-strength").addEventListener("input", (ev) => { state.maxStrength = ev.target.valueAsNumber; rerunSoon(); });
    $("min-consistency").addEventListener("input", (ev) => { state.minConsistency = ev.target.valueAsNumber; rerunSoon(); });
    $("strength-off").addEventListener("change", (ev) => { state.strengthOff = ev.target.checked; rerunSoon(); });
    $("consistency-off").addEventListener("change", (ev) => { state.consistencyOff = ev.target.checked; rerunSoon(); });
    $("reset-filters").addEventListener("click", () => { initFilters(); rerunSoon(); });
  }

  async function start() {
    wire();
    try {
      const [index, list] = await Promise.all([getJson("index"), getJson("loras", { limit: 100000 })]);
      state.index = index;
      state.thresholds = list.thresholds;
      state.all = list.items;
      list.items.forEach((p) => state.points.set(p.lora_id, p));
    } catch (e) {
      fail(e);
      return;
    }
    initFilters();
    if (!state.index.search_available) {
      show($("notice"), "Text search is unavailable on this server: " + state.index.search_unavailable_reason +
           ". The page still browses: every LoRA below opens its details, and “more like this” finds LoRAs that act alike.");
    }
    const url = new URL(location.href);
    const q = (url.searchParams.get("q") || "").trim();
    const like = url.searchParams.get("like");
    if (like) {
      state.mode = "like";
      state.like = like;
    } else if (q) {
      state.mode = "search";
      state.query = q;
      $("q").value = q;
    } else {
      state.mode = state.index.search_available ? null : "browse";
    }
    if (state.mode) {
      run();
    } else {
      describeFilters();
      show($("status"), "Describe the effect you want above; results are ranked by what each LoRA does to images, not by its description.");
      document.body.setAttribute("data-state", "ready");
    }
    $("q").focus();
  }

  start();
})();
