// A LoRA's page: signature, per-category chart, thumbnails, similar LoRAs, near-duplicates, source metadata.
"use strict";

(function () {
  const { el, svg, clear, getJson, fmt, loraHref, likeHref, show, quadrantBadge, against, chips, safeHttpUrl } = CR;
  const $ = (id) => document.getElementById(id);

  function kvRows(table, rows) {
    const body = clear(table.tBodies[0]);
    for (const [key, value] of rows) {
      if (value === null || value === undefined || value === "") continue;
      body.appendChild(el("tr", {}, el("th", { scope: "row" }, key), el("td", {}, value)));
    }
  }

  function categoryChart(cats, th) {
    const W = 760, rowH = 26, left = 170, gap = 16, colW = (W - left - gap) / 2;
    const H = 30 + rowH * cats.length;
    const sMax = Math.max(th.max_strength || 0, ...cats.map((c) => c.strength || 0)) * 1.1 || 1;
    const cMax = Math.max(th.min_consistency || 0, ...cats.map((c) => c.consistency || 0)) * 1.1 || 1;
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img",
                               "aria-label": "strength and consistency per category" });
    chart.appendChild(svg("text", { x: left, y: 14, class: "axis-title" }, "strength"));
    chart.appendChild(svg("text", { x: left + colW + gap, y: 14, class: "axis-title" }, "within-category consistency"));
    cats.forEach((c, i) => {
      const y = 24 + i * rowH;
      chart.appendChild(svg("text", { x: left - 8, y: y + 14, "text-anchor": "end", class: "cat-label" }, c.category));
      const sw = c.strength ? Math.max(0, c.strength) / sMax * colW : 0;
      const cw = c.consistency ? Math.max(0, c.consistency) / cMax * colW : 0;
      chart.appendChild(svg("rect", { x: left, y: y + 3, width: sw, height: rowH - 8, class: "bar-s" },
                            svg("title", {}, c.category + ": strength " + fmt(c.strength, 4))));
      chart.appendChild(svg("rect", { x: left + colW + gap, y: y + 3, width: cw, height: rowH - 8, class: "bar-c" },
                            svg("title", {}, c.category + ": consistency " + fmt(c.consistency, 4))));
      chart.appendChild(svg("text", { x: left + sw + 4, y: y + 15, class: "bar-value" }, fmt(c.strength, 3)));
      chart.appendChild(svg("text", { x: left + colW + gap + cw + 4, y: y + 15, class: "bar-value" }, fmt(c.consistency, 3)));
    });
    if (th.max_strength !== null) {
      const x = left + th.max_strength / sMax * colW;
      chart.appendChild(svg("line", { x1: x, x2: x, y1: 20, y2: H, class: "threshold" }, svg("title", {}, "max strength " + fmt(th.max_strength, 4))));
    }
    if (th.min_consistency !== null) {
      const x = left + colW + gap + th.min_consistency / cMax * colW;
      chart.appendChild(svg("line", { x1: x, x2: x, y1: 20, y2: H, class: "threshold" }, svg("title", {}, "min consistency " + fmt(th.min_consistency, 4))));
    }
    return chart;
  }

  function smallCard(hit) {
    return el("article", { class: "card small", "data-lora-id": hit.lora_id },
      el("div", { class: "card-body" },
        el("h3", {}, el("a", { href: loraHref(hit.lora_id), class: "name" }, hit.name || hit.lora_id)),
        el("p", { class: "meta" }, el("span", { class: "score" }, "cosine " + fmt(hit.score, 3))),
        el("p", { class: "sc" }, el("span", {}, "strength " + fmt(hit.strength, 3)), el("span", {}, "consistency " + fmt(hit.consistency, 3))),
        el("p", { class: "links" }, el("a", { href: likeHref(hit.lora_id), class: "more-like-this" }, "more like this"),
          el("a", { href: loraHref(hit.lora_id), class: "details" }, "details"))));
  }

  function metadataCheck(check) {
    const box = $("metadata-check");
    if (!check) return;
    box.className = "check check-" + check.status;
    const mark = { agrees: "✓ Metadata agrees with behaviour", weak: "~ Metadata loosely matches behaviour",
                   disagrees: "⚠ Metadata disagrees with behaviour", no_text: "No metadata to check",
                   unavailable: "Metadata not checked" }[check.status] || check.status;
    clear(box).appendChild(el("strong", {}, mark));
    box.appendChild(document.createTextNode(" — " + check.detail));
    if (check.query) box.appendChild(el("span", { class: "hint block" }, "Query made of its words: “" + check.query + "”"));
  }

  async function start() {
    const id = new URL(location.href).searchParams.get("id");
    if (!id) {
      show($("error"), "No LoRA given: open this page from a search result, or add ?id=<lora_id> to the address.");
      document.body.setAttribute("data-state", "error");
      return;
    }
    let p;
    try {
      p = await getJson("loras/" + encodeURIComponent(id) + "/profile");
    } catch (e) {
      show($("error"), e.status === 404 ? "Unknown LoRA: " + e.message + ". Search for it from the search page." : e.message);
      document.body.setAttribute("data-state", "error");
      return;
    }
    const th = p.thresholds;
    document.title = "carlos-ray · " + (p.name || p.lora_id);
    $("name").textContent = p.name || p.lora_id;
    $("lora-id").textContent = p.lora_id;
    clear($("quadrant")).appendChild(quadrantBadge(p.quadrant));
    metadataCheck(p.metadata_check);
    kvRows($("signature"), [
      ["strength", against(p.strength, th.max_strength, "<=") + (p.strength_std !== null ? "  (std " + fmt(p.strength_std, 3) + ")" : "")],
      ["consistency", against(p.consistency, th.min_consistency, ">=")],
      ["quadrant", p.quadrant + " — " + (CR.QUADRANTS[p.quadrant] || CR.QUADRANTS.undefined).words],
      ["diff vectors", p.n],
      ["format", p.format],
      ["rank", p.rank],
      ["sha256", p.sha256],
      ["indexed", p.indexed_at],
    ]);
    if (p.categories.length) {
      $("categories-section").hidden = false;
      clear($("categories")).appendChild(categoryChart(p.categories, th));
    }
    if (p.thumbnails) {
      $("thumbnails-section").hidden = false;
      $("thumbnails").src = "loras/" + encodeURIComponent(p.lora_id) + "/thumbnails";
      $("thumbnail-prompts").textContent = "Columns, left to right: " + p.thumbnail_prompts.join(", ") + ".";
    }
    if (p.duplicates.length) {
      $("duplicates-section").hidden = false;
      const ul = clear($("duplicates"));
      p.duplicates.forEach((d) => ul.appendChild(el("li", {}, el("a", { href: loraHref(d.lora_id) }, d.name || d.lora_id),
                                                     " — cosine " + fmt(d.cosine, 4) + ", strength " + fmt(d.strength, 3))));
    }
    const source = safeHttpUrl(p.source_url);
    kvRows($("metadata"), [
      ["name", p.name],
      ["trigger words", (p.trigger_words || []).length ? chips(p.trigger_words, "triggers") : null],
      ["source", source ? el("a", { href: source, rel: "noopener noreferrer nofollow", target: "_blank" }, p.source_url) : p.source_url],
      ["civitai model", p.civitai_model_id],
      ["civitai version", p.civitai_version_id],
      ["downloads", p.download_count],
    ]);
    $("description").textContent = p.description || "(no description)";
    $("lora").hidden = false;
    try {
      const sim = await getJson("loras/" + encodeURIComponent(p.lora_id) + "/similar", { k: 8, max_strength: "inf", min_consistency: 0 });
      const box = clear($("similar"));
      sim.hits.forEach((h) => box.appendChild(smallCard(h)));
      show($("similar-status"), sim.hits.length ? "" : "No other LoRA in the index.");
    } catch (e) {
      show($("similar-status"), e.message);
    }
    document.body.setAttribute("data-state", "ready");
  }

  start();
})();
