// The index page: interactive Strength-Consistency scatter with the thresholds, counts, configuration.
"use strict";

(function () {
  const { el, svg, clear, getJson, fmt, loraHref, show, QUADRANTS } = CR;
  const $ = (id) => document.getElementById(id);

  function scatter(points, th) {
    const W = 820, H = 520, L = 64, R = 20, T = 20, B = 48;
    const xs = points.map((p) => p.strength), ys = points.map((p) => p.consistency);
    const span = (vals, extra) => {
      let lo = Math.min(...vals, extra === null ? Infinity : extra), hi = Math.max(...vals, extra === null ? -Infinity : extra);
      if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
      const pad = (hi - lo || Math.abs(hi) || 1) * 0.08;
      return [lo - pad, hi + pad];
    };
    const [x0, x1] = span(xs, th.max_strength), [y0, y1] = span(ys, th.min_consistency);
    const X = (v) => L + (v - x0) / (x1 - x0) * (W - L - R);
    const Y = (v) => H - B - (v - y0) / (y1 - y0) * (H - T - B);
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", id: "scatter-svg",
                               "aria-label": "strength versus consistency of every LoRA" });
    chart.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot-bg" }));
    for (let i = 0; i <= 5; i++) {
      const xv = x0 + (x1 - x0) * i / 5, yv = y0 + (y1 - y0) * i / 5;
      chart.appendChild(svg("text", { x: X(xv), y: H - B + 18, "text-anchor": "middle", class: "tick" }, fmt(xv, 3)));
      chart.appendChild(svg("text", { x: L - 6, y: Y(yv) + 4, "text-anchor": "end", class: "tick" }, fmt(yv, 3)));
    }
    chart.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", class: "axis-title" }, "strength (mean diff norm)"));
    chart.appendChild(svg("text", { x: 14, y: (T + H - B) / 2, transform: "rotate(-90 14 " + (T + H - B) / 2 + ")",
                                    "text-anchor": "middle", class: "axis-title" }, "consistency (mean pairwise cosine)"));
    if (th.max_strength !== null) {
      chart.appendChild(svg("line", { x1: X(th.max_strength), x2: X(th.max_strength), y1: T, y2: H - B, class: "threshold", id: "threshold-strength" },
                            svg("title", {}, "max strength " + fmt(th.max_strength, 4))));
    }
    if (th.min_consistency !== null) {
      chart.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(th.min_consistency), y2: Y(th.min_consistency), class: "threshold", id: "threshold-consistency" },
                            svg("title", {}, "min consistency " + fmt(th.min_consistency, 4))));
    }
    const tip = $("tooltip");
    for (const p of points) {
      const link = svg("a", { href: loraHref(p.lora_id), class: "point", "data-lora-id": p.lora_id });
      const dot = svg("circle", { cx: X(p.strength), cy: Y(p.consistency), r: 5, fill: (QUADRANTS[p.quadrant] || QUADRANTS.undefined).colour });
      link.appendChild(dot);
      link.addEventListener("mouseenter", () => {
        clear(tip);
        tip.appendChild(el("strong", {}, p.name || p.lora_id));
        tip.appendChild(el("span", { class: "block" }, "strength " + fmt(p.strength, 4) + ", consistency " + fmt(p.consistency, 4)));
        tip.appendChild(el("span", { class: "block" }, p.quadrant));
        tip.style.left = (X(p.strength) + 12) + "px";
        tip.style.top = (Y(p.consistency) - 10) + "px";
        tip.hidden = false;
      });
      link.addEventListener("mouseleave", () => { tip.hidden = true; });
      chart.appendChild(link);
    }
    return chart;
  }

  async function start() {
    let index, list;
    try {
      [index, list] = await Promise.all([getJson("index"), getJson("loras", { limit: 100000 })]);
    } catch (e) {
      show($("error"), e.message);
      document.body.setAttribute("data-state", "error");
      return;
    }
    const th = list.thresholds;
    const placed = list.items.filter((p) => p.strength !== null && p.consistency !== null);
    clear($("scatter")).appendChild(scatter(placed, th));
    const counts = clear($("counts").tBodies[0]);
    for (const [q, info] of Object.entries(QUADRANTS)) {
      counts.appendChild(el("tr", { "data-quadrant": q }, el("td", {}, CR.quadrantBadge(q)), el("td", {}, info.rule), el("td", { class: "num" }, String(list.quadrant_counts[q] || 0))));
    }
    counts.appendChild(el("tr", {}, el("td", {}, "all"), el("td", {}, ""), el("td", { class: "num" }, String(list.total))));
    const body = clear($("config").tBodies[0]);
    const json = (v) => (v && typeof v === "object" ? JSON.stringify(v) : v);
    const rows = [
      ["version", index.version], ["created", index.created_at], ["updated", index.updated_at], ["configuration", index.config_name],
      ["configuration hash", index.config_hash], ["source", index.source], ["encoder", json(index.encoder)], ["query", json(index.query)],
      ["thresholds", json(index.thresholds)], ["counts", json(index.counts)], ["LoRAs served", index.loras], ["direction width", index.dim],
      ["text search", index.search_available ? "available" : "unavailable: " + index.search_unavailable_reason],
    ];
    for (const [k, v] of rows) {
      if (v === null || v === undefined) continue;
      body.appendChild(el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, String(v))));
    }
    document.body.setAttribute("data-state", "ready");
  }

  start();
})();
