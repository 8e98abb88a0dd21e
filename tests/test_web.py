"""The search page, the LoRA page, the index page and the offline /docs in a real headless Chromium.

The pages are served by the session's Serve app (conftest ``served``: the tiny built index plus one LoRA
whose every text field is hostile HTML, and ``/ref``, whose encoder is not on this machine). What the
browser shows is checked against the in-process Ranker and QueryEncoder, the index's Parquet tables
read directly, and numpy. Every browser test fails on any JavaScript error or dialog (``browser_page``).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from carlos_ray.serving import load_query_encoder, load_ranker
from carlos_ray.store import Index
from tests.conftest import HOSTILE_DESCRIPTION, HOSTILE_NAME, HOSTILE_TRIGGERS, BrowserPage

K = 12  # results the search page asks for
STATIC = Path(__file__).resolve().parents[1] / "carlos_ray" / "serving" / "web" / "static"


@pytest.fixture(scope="module")
def web(served):
    idx = str(served["idx"])
    ranker, manifest = load_ranker(idx)
    sig = Index(idx).snapshot().signatures()
    return {**served, "ranker": ranker, "manifest": manifest, "encoder": load_query_encoder(manifest), "table": sig,
            "thresholds": manifest.thresholds}


def _cards(page, where: str = "#results") -> list[str]:
    return page.eval_on_selector_all(f"{where} .card", "els => els.map(e => e.getAttribute('data-lora-id'))")


def _ready(page) -> None:
    page.wait_for_selector("body[data-state=ready], body[data-state=error]", timeout=60_000)


def _search_ids(web, query: str, **filters) -> list[str]:
    vec = web["encoder"].encode([query])[0]
    return [h.lora_id for h in web["ranker"].search(vec, k=K, **filters)]


def _set_range(page, selector: str, value: float) -> float:
    """Move a slider as a drag does (value, then an input event); returns the value the slider took."""
    return page.eval_on_selector(selector, """(el, v) => { el.value = String(v);
        el.dispatchEvent(new Event('input', { bubbles: true })); return el.valueAsNumber; }""", value)


# ---- the fixture itself ----------------------------------------------------------------------------------
def test_browser_page_records_errors_dialogs_and_screenshots(browser, tmp_path):
    bp = BrowserPage(browser, tmp_path / "shots")
    try:
        bp.page.set_content("<p>x</p><script>setTimeout(() => { throw new Error('boom') }, 0); alert('hi');"
                            "console.error('expected 404 thing'); console.error('other')</script>")
        bp.page.wait_for_timeout(200)
        path = bp.shot("page")
    finally:
        bp.close()
    assert any("boom" in e for e in bp.errors) and any("other" in e for e in bp.errors)
    assert bp.dialogs == ["alert: hi"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bp2 = BrowserPage(browser, tmp_path / "shots2")
    bp2.allow(r"expected 404")
    try:
        bp2.page.set_content("<script>console.error('expected 404 thing')</script>")
        bp2.page.wait_for_timeout(100)
    finally:
        bp2.close()
    assert bp2.errors == []


# ---- the search page ---------------------------------------------------------------------------------------
def test_search_page_ranks_filters_and_links(web, browser_page):
    bp, page, url = browser_page, browser_page.page, web["url"]
    th = web["thresholds"]
    page.goto(url + "/")
    _ready(page)
    assert page.input_value("#max-strength") and float(page.eval_on_selector("#max-strength", "e => e.max")) > th["max_strength"]
    assert "strength ≤ " in page.text_content("#strength-keeps") and "focused and erratic" in page.text_content("#strength-keeps")
    assert "focused and overpowering" in page.text_content("#consistency-keeps")
    assert "exactly the focused quadrant" in page.text_content("#filter-summary")
    page.fill("#q", "watercolor")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")
    _ready(page)
    default = _cards(page)
    assert default == _search_ids(web, "watercolor") and default, default
    assert "q=watercolor" in page.url
    with_thumbs = {p["lora_id"] for p in requests.get(url + "/loras", params={"limit": 1000}, timeout=30).json()["items"]
                   if p["thumbnails"]}
    assert page.locator("#results .card img.thumb").count() == len(set(default) & with_thumbs) > 0
    page.wait_for_function("() => [...document.querySelectorAll('#results img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
    bp.shot("1-search")
    first = page.locator("#results .card").first
    assert "score " in first.text_content() and "strength " in first.text_content()

    # a tighter strength filter: the slider takes a value between the strengths of the current results
    strengths = sorted(web["ranker"].get(i)["strength"] for i in default)
    cut = _set_range(page, "#max-strength", (strengths[0] + strengths[-1]) / 2)
    _ready(page)
    tighter = _cards(page)
    expected = _search_ids(web, "watercolor", max_strength=cut, min_consistency=th["min_consistency"])
    assert tighter == expected and tighter != default, (cut, tighter, default)
    assert "index threshold" in page.text_content("#strength-keeps")
    bp.shot("2-filtered")
    page.check("#strength-off")
    _ready(page)
    assert _cards(page) == _search_ids(web, "watercolor", max_strength=math.inf, min_consistency=th["min_consistency"])
    page.uncheck("#strength-off")
    page.click("#reset-filters")
    _ready(page)
    assert _cards(page) == default

    # "more like this" on the first result
    top = default[0]
    page.locator("#results .card").first.locator("a.more-like-this").click()
    page.wait_for_url(re.compile(r"like="))
    _ready(page)
    like = _cards(page)
    assert like == [h.lora_id for h in web["ranker"].similar(top, k=K)] and top not in like
    assert "act like" in page.text_content("#results-title")
    bp.shot("3-more-like-this")

    # "details" of the first similar LoRA
    other = like[0]
    page.locator("#results .card").first.locator("a.details").click()
    page.wait_for_url(re.compile(r"/lora\?id="))
    _ready(page)
    row = web["ranker"].get(other)
    assert page.text_content("#lora-id") == other
    assert page.text_content("h1") == (row["name"] or other)
    page.wait_for_selector("#similar .card")
    sim = [h.lora_id for h in web["ranker"].similar(other, k=8, max_strength=math.inf, min_consistency=0.0)]
    assert _cards(page, "#similar") == sim
    sig_text = page.text_content("#signature")
    assert f"{row['strength']:.3g} ≤ " in sig_text
    n_cats = len(row["category_names"] or [])
    assert page.locator("#categories rect.bar-s").count() == n_cats == page.locator("#categories rect.bar-c").count() > 0
    page.wait_for_function("() => { const i = document.getElementById('thumbnails'); return i.complete && i.naturalWidth > 0 }")
    bp.shot("4-lora-page")

    # an empty query is explained in words
    page.goto(url + "/")
    _ready(page)
    page.fill("#q", "   ")
    page.click("#go")
    assert page.is_visible("#error") and "Type a few words" in page.text_content("#error")
    assert _cards(page) == []
    bp.shot("5-empty-query")
    assert sorted(p.name for p in bp.out_dir.glob("*.png")) == [
        "1-search.png", "2-filtered.png", "3-more-like-this.png", "4-lora-page.png", "5-empty-query.png"]


def test_page_load_to_first_results_time_is_logged(web, browser_page, record_property):
    page, url = browser_page.page, web["url"]
    page.goto(url + "/?q=neon")  # warm: the encoder and the page's files are loaded
    page.wait_for_selector("#results .card")
    times = []
    for q in ("watercolor", "neon city at night", "a photo of a dog"):
        t0 = time.perf_counter()
        page.goto(url + "/?q=" + requests.utils.quote(q))
        page.wait_for_selector("#results .card")
        wall = time.perf_counter() - t0
        in_page = page.evaluate("() => window.crTimings.firstResultsMs")  # since navigation start
        assert _cards(page) == _search_ids(web, q)
        times.append((q, wall * 1000, in_page))
    for q, wall_ms, page_ms in times:
        print(f"page load to first results for {q!r}: {wall_ms:.0f} ms (goto to cards), {page_ms:.0f} ms (navigation start to render)")
    record_property("first_results_ms", [round(t[2]) for t in times])


# ---- hostile text ------------------------------------------------------------------------------------------
INJECTION_PROBE = """() => {
  const onAttrs = [...document.querySelectorAll('*')].flatMap(e => [...e.attributes].filter(a => /^on/i.test(a.name)).map(a => e.tagName + ' ' + a.name));
  return {
    onAttrs,
    foreignImgs: [...document.querySelectorAll('img')].map(i => i.getAttribute('src')).filter(s => s !== null && !/^loras\\/[^/]+\\/thumbnails$/.test(s)),
    scripts: [...document.querySelectorAll('script')].map(s => s.getAttribute('src')),
    iframes: document.querySelectorAll('iframe').length,
    styles: document.querySelectorAll('style').length,
    jsLinks: [...document.querySelectorAll('a')].map(a => a.getAttribute('href') || '').filter(h => /^\\s*javascript:/i.test(h)),
    bold: [...document.querySelectorAll('b')].filter(b => b.textContent === 'bold').length,
  };
}"""


def _assert_inert(page) -> None:
    probe = page.evaluate(INJECTION_PROBE)
    assert probe["onAttrs"] == [] and probe["foreignImgs"] == [] and probe["iframes"] == 0 and probe["styles"] == 0, probe
    assert probe["jsLinks"] == [] and all(s and s.startswith("static/") for s in probe["scripts"]), probe
    assert probe["bold"] == 0, probe
    assert page.evaluate("() => document.body.offsetHeight") > 100  # the injected <style> did not hide the page


def test_hostile_names_and_descriptions_are_shown_as_text(web, browser_page):
    bp, page, url = browser_page, browser_page.page, web["url"]
    hid = web["hostile_id"]
    # in the results: the hostile copy passes the default filters, so a query with k=12 over <= 12 LoRAs lists it
    page.goto(url + "/?q=" + requests.utils.quote(HOSTILE_NAME))
    page.wait_for_selector(f"#results .card[data-lora-id='{hid}']")
    card = page.locator(f"#results .card[data-lora-id='{hid}']")
    assert card.locator("h3").text_content() == HOSTILE_NAME
    assert card.locator(".triggers li").all_text_contents() == HOSTILE_TRIGGERS
    assert card.locator(".desc").text_content() == HOSTILE_DESCRIPTION[:240]
    assert HOSTILE_NAME in page.text_content("#results-title")
    _assert_inert(page)
    bp.shot("hostile-results")
    # "more like this" of the hostile LoRA: its name is in the title
    card.locator("a.more-like-this").click()
    page.wait_for_url(re.compile("like="))
    _ready(page)
    assert page.text_content("#results-title") == f"LoRAs that act like “{HOSTILE_NAME}”"
    _assert_inert(page)
    # its own page
    page.goto(url + "/lora?id=" + hid)
    _ready(page)
    assert page.text_content("h1") == HOSTILE_NAME and page.title() == f"carlos-ray · {HOSTILE_NAME}"
    assert page.text_content("#description") == HOSTILE_DESCRIPTION
    assert page.locator("#metadata .triggers li").all_text_contents() == HOSTILE_TRIGGERS
    assert "javascript:alert(10)" in page.text_content("#metadata")  # shown, not linked
    assert page.is_visible("#duplicates-section")  # a copy of another LoRA's signature: a near-duplicate
    _assert_inert(page)
    assert page.locator("#thumbnails-section").is_hidden()  # it has no thumbnails; no broken image either
    bp.shot("hostile-lora-page")
    # the scatter tooltip
    page.goto(url + "/overview")
    _ready(page)
    # its point sits exactly under its twin's (same signature), so the pointer is sent to its own element
    page.dispatch_event(f"#scatter a.point[data-lora-id='{hid}']", "mouseenter")
    assert page.locator("#tooltip strong").text_content() == HOSTILE_NAME
    _assert_inert(page)
    assert bp.dialogs == []


# ---- encoder unavailable, unknown LoRA -------------------------------------------------------------------
def test_unavailable_encoder_page_still_browses(web, browser_page):
    bp, page, url = browser_page, browser_page.page, web["url"]
    page.goto(url + "/ref")  # no trailing slash: redirected, so the page's relative links stay under /ref
    _ready(page)
    assert page.url == url + "/ref/"
    notice = page.text_content("#notice")
    assert "Text search is unavailable" in notice and "ViT-B-32" in notice and "still browses" in notice
    ref_sig = Index(str(web["ref"])).snapshot().signatures().to_pylist()
    th = json.loads((web["ref"] / "manifest.json").read_text())["thresholds"]
    passing = [r for r in ref_sig if r["strength"] <= th["max_strength"] and r["consistency"] >= th["min_consistency"]]
    by_name = [r["lora_id"] for r in sorted(passing, key=lambda r: ((r["name"] or "").lower(), r["lora_id"]))]
    assert _cards(page) == by_name
    bp.shot("ref-browse")
    page.fill("#q", "watercolor")
    page.press("#q", "Enter")
    assert "Text search is unavailable" in page.text_content("#error")
    # similar and details still work
    page.goto(url + "/ref/")
    _ready(page)
    lid = _cards(page)[0]
    page.locator("#results .card").first.locator("a.more-like-this").click()
    page.wait_for_url(re.compile("like="))
    _ready(page)
    ref_ranker, _ = load_ranker(str(web["ref"]))
    assert _cards(page) == [h.lora_id for h in ref_ranker.similar(lid, k=K)]
    page.goto(url + "/ref/lora?id=" + lid)
    _ready(page)
    assert page.text_content("#lora-id") == lid
    assert "Not checked" in page.text_content("#metadata-check") and "ViT-B-32" in page.text_content("#metadata-check")
    bp.shot("ref-lora")


def test_unknown_lora_is_explained(web, browser_page):
    bp, page, url = browser_page, browser_page.page, web["url"]
    bp.allow(r"status of 404")  # the browser logs the API's 404 answer; the page explains it
    page.goto(url + "/lora?id=no-such-lora")
    _ready(page)
    text = page.text_content("#error")
    assert "Unknown LoRA" in text and "no-such-lora" in text and page.locator("#lora").is_hidden()
    page.goto(url + "/?like=no-such-lora")
    _ready(page)
    assert "no-such-lora" in page.text_content("#error")
    page.goto(url + "/lora")
    _ready(page)
    assert "No LoRA given" in page.text_content("#error")
    bp.shot("unknown-lora")


# ---- the index page ------------------------------------------------------------------------------------------
def test_index_page_scatter_counts_and_configuration(web, browser_page):
    bp, page, url = browser_page, browser_page.page, web["url"]
    sig = Index(str(web["idx"])).snapshot().signatures()
    th = Index(str(web["idx"])).read_manifest().thresholds
    s, c = sig["strength"].to_numpy(), sig["consistency"].to_numpy()
    page.goto(url + "/overview")
    _ready(page)
    finite = np.isfinite(s) & np.isfinite(c)
    assert page.locator("#scatter a.point").count() == int(finite.sum())
    assert page.locator("#threshold-strength").count() == 1 and page.locator("#threshold-consistency").count() == 1
    want = {"focused": int(np.sum((s <= th["max_strength"]) & (c >= th["min_consistency"]))),
            "overpowering": int(np.sum((s > th["max_strength"]) & (c >= th["min_consistency"]))),
            "chaotic": int(np.sum((s > th["max_strength"]) & (c < th["min_consistency"]))),
            "erratic": int(np.sum((s <= th["max_strength"]) & (c < th["min_consistency"])))}
    for q, n in want.items():
        assert page.text_content(f"#counts tr[data-quadrant={q}] td.num") == str(n), q
    # the point of the strongest LoRA sits right of the strength line, the weakest left of it
    xs = page.eval_on_selector_all("#scatter a.point", "els => els.map(e => [e.getAttribute('data-lora-id'), +e.firstChild.getAttribute('cx')])")
    x_of = dict(xs)
    line_x = float(page.get_attribute("#threshold-strength", "x1"))
    ids = sig["lora_id"].to_pylist()
    assert x_of[ids[int(np.nanargmax(s))]] >= line_x - 1e-6 or np.nanmax(s) <= th["max_strength"]
    assert x_of[ids[int(np.nanargmin(s))]] < line_x
    config = page.text_content("#config")
    assert web["manifest"].config_hash in config and "available" in config
    # hover the strongest LoRA whose point no other LoRA shares (test_serve's swap adds a copy of a row's numbers)
    pairs = list(zip(s.tolist(), c.tolist()))
    alone = [i for i in range(len(ids)) if finite[i] and pairs.count(pairs[i]) == 1]
    target = ids[max(alone, key=lambda i: s[i])]
    page.hover(f"#scatter a.point[data-lora-id='{target}']", force=True)
    name = sig["name"].to_pylist()[ids.index(target)] or target
    assert page.locator("#tooltip").is_visible() and page.text_content("#tooltip strong") == name
    bp.shot("index-page")
    page.click(f"#scatter a.point[data-lora-id='{target}']", force=True)
    page.wait_for_url(re.compile(r"/lora\?id="))
    _ready(page)
    assert page.text_content("#lora-id") == target


# ---- offline API docs ----------------------------------------------------------------------------------------
def test_offline_docs_render_from_this_server_only(web, browser_page):
    bp, page, url = browser_page, browser_page.page, web["url"]
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.getAttribute('data-path'))")
    for p in ("/search", "/loras", "/loras/{lora_id}/profile", "/loras/{lora_id}/thumbnails", "/healthz"):
        assert p in paths, paths
    assert requested and all(u.startswith(url + "/") or u.startswith("data:") for u in requested), requested
    bp.shot("docs")
    page.goto(url + "/ref/docs")  # under a route prefix too
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)


# ---- the page's HTTP side (no browser) ---------------------------------------------------------------------
def test_security_headers_and_no_inline_script(web):
    for path in ("/", "/lora?id=x", "/overview", "/docs", "/static/search.js", "/index", "/nowhere"):
        r = requests.get(web["url"] + path, timeout=30)
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp, (path, csp)
        assert r.headers.get("x-content-type-options") == "nosniff"
    for path in ("/", "/lora", "/overview", "/docs"):  # the pages as served (a shell around a body file)
        text = requests.get(web["url"] + path, timeout=30).text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", text, flags=re.S)
        assert scripts and all('src="static/' in attrs and body.strip() == "" for attrs, body in scripts), path
        assert not re.search(r"\son[a-z]+\s*=", text), path
        assert "http://" not in text and "https://" not in text, path  # nothing from another origin
        assert text.startswith("<!doctype html>") and text.count("<title>carlos-ray · ") == 1, path
        assert text.count('aria-current="page"') == (path in ("/", "/overview")), path
    for js in STATIC.glob("*.js"):
        code = js.read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", code), js.name
    assert requests.get(web["url"] + "/static/..%2Fcatalog.py", timeout=30).status_code == 404
    assert requests.get(web["url"] + "/static/swagger/index.html", timeout=30).status_code == 404
    for method in (requests.post, requests.delete):
        assert method(web["url"] + "/", timeout=30).status_code == 405  # the page only reads


def test_lora_list_matches_the_index(web):
    r = requests.get(web["url"] + "/loras", params={"limit": 100000}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    sig = Index(str(web["idx"])).snapshot().signatures().to_pylist()
    th = body["thresholds"]
    assert (th["max_strength"], th["min_consistency"]) == (web["thresholds"]["max_strength"], web["thresholds"]["min_consistency"])
    assert body["total"] == len(sig) == len(body["items"])
    want = sorted(sig, key=lambda x: ((x["name"] or "").lower(), x["lora_id"]))
    assert [i["lora_id"] for i in body["items"]] == [x["lora_id"] for x in want]
    thumbs = set(Index(str(web["idx"])).snapshot().table("thumbs").column("lora_id").to_pylist())
    for item, row in zip(body["items"], want):
        assert item["strength"] == pytest.approx(row["strength"]) and item["consistency"] == pytest.approx(row["consistency"])
        strong, directed = row["strength"] > th["max_strength"], row["consistency"] >= th["min_consistency"]
        assert item["quadrant"] == {(False, True): "focused", (True, True): "overpowering", (True, False): "chaotic",
                                    (False, False): "erratic"}[(strong, directed)]
        assert item["thumbnails"] == (row["lora_id"] in thumbs)
    assert sum(body["quadrant_counts"].values()) == len(sig)
    page2 = requests.get(web["url"] + "/loras", params={"offset": 2, "limit": 3}, timeout=30).json()
    assert [i["lora_id"] for i in page2["items"]] == [x["lora_id"] for x in want[2:5]]
    for params in ({"limit": 0}, {"limit": 100001}, {"offset": -1}, {"limit": "x"}):
        bad = requests.get(web["url"] + "/loras", params=params, timeout=30)
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_request", (params, bad.text)


def test_thumbnails_png_is_the_stored_images_base_above_lora(web):
    from PIL import Image

    from carlos_ray.serving.web.catalog import THUMB_GAP

    snap = Index(str(web["idx"])).snapshot()
    thumbs = snap.table("thumbs").to_pylist()
    lid = thumbs[0]["lora_id"]
    mine = sorted((t["prompt_idx"], t["png"]) for t in thumbs if t["lora_id"] == lid)
    base = {b["prompt_idx"]: b["thumb"] for b in snap.base(snap.manifest.base_key).to_pylist() if b["seed_idx"] == 0}
    r = requests.get(f"{web['url']}/loras/{lid}/thumbnails", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and "max-age" in r.headers["cache-control"]
    grid = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    for col, (p, png) in enumerate(mine):
        for row, data in ((0, base[p]), (1, png)):
            small = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            f = grid.shape[0] // 2 // small.shape[0]  # whole enlargement factor
            cell = small.shape[0] * f
            y, x = THUMB_GAP + row * (cell + THUMB_GAP), THUMB_GAP + col * (cell + THUMB_GAP)
            expected = np.repeat(np.repeat(small, f, axis=0), f, axis=1)
            assert np.array_equal(grid[y:y + cell, x:x + cell], expected), (row, col)
    assert grid.shape == (2 * cell + 3 * THUMB_GAP, len(mine) * (cell + THUMB_GAP) + THUMB_GAP, 3)
    again = requests.get(f"{web['url']}/loras/{lid}/thumbnails", timeout=30)
    assert again.content == r.content
    for lora, code in (("no-such-lora", "unknown_lora"), (web["hostile_id"], "no_thumbnails")):
        bad = requests.get(f"{web['url']}/loras/{lora}/thumbnails", timeout=30)
        assert bad.status_code == 404 and bad.json()["error"] == code, bad.text


def test_profile_duplicates_categories_and_metadata_check(web):
    from carlos_ray.serving.web.catalog import metadata_text

    hid = web["hostile_id"]
    r = requests.get(f"{web['url']}/loras/{hid}/profile", timeout=60)
    assert r.status_code == 200, r.text
    prof = r.json()
    sig = Index(str(web["idx"])).snapshot().signatures().to_pylist()
    row = next(x for x in sig if x["lora_id"] == hid)
    assert prof["name"] == HOSTILE_NAME and prof["description"] == HOSTILE_DESCRIPTION and prof["trigger_words"] == HOSTILE_TRIGGERS
    assert [c["category"] for c in prof["categories"]] == row["category_names"]
    assert [c["strength"] for c in prof["categories"]] == pytest.approx(row["category_strength"])
    # near-duplicates: the rows whose direction is (numerically) the hostile copy's
    d = np.array(row["direction"], dtype=np.float64)
    twins = {x["lora_id"] for x in sig if x["lora_id"] != hid
             and np.dot(x["direction"], d) / (np.linalg.norm(x["direction"]) * np.linalg.norm(d) + 1e-300) >= 0.98
             and abs(x["strength"] - row["strength"]) <= 0.1 * max(x["strength"], row["strength"])}
    assert twins and twins <= {x["lora_id"] for x in prof["duplicates"]}
    # the metadata check: its words as a query, ranked among all LoRAs by plain numpy cosines
    check = prof["metadata_check"]
    text = metadata_text(row["name"], row["trigger_words"], row["description"], web["manifest"].query["max_query_chars"])
    assert check["query"] == text and "<img" not in text and "<script" not in text and "ok-word" in text
    q = web["encoder"].encode([text])[0].astype(np.float64)
    dirs = np.array([x["direction"] for x in sig], dtype=np.float64)
    cos = dirs @ q / (np.linalg.norm(dirs, axis=1) * np.linalg.norm(q))
    cos = np.nan_to_num(cos)
    mine = cos[[x["lora_id"] for x in sig].index(hid)]
    assert 1 + int(np.sum(cos > mine + 1e-9)) <= check["rank"] <= int(np.sum(cos > mine - 1e-9))  # ties: its twin
    assert check["total"] == len(sig) and check["score"] == pytest.approx(mine, abs=1e-5)
    frac = (check["rank"] - 1) / (len(sig) - 1)
    assert check["status"] == ("agrees" if frac <= 0.25 else "disagrees" if frac > 0.5 else "weak")
    bad = requests.get(f"{web['url']}/loras/no-such/profile", timeout=30)
    assert bad.status_code == 404 and bad.json()["error"] == "unknown_lora"
    ref = requests.get(f"{web['url']}/ref/loras/{sig[0]['lora_id']}/profile", timeout=30).json()
    assert ref["metadata_check"]["status"] == "unavailable"
