"""Prompt sets: the shipped P and P' files, ids, subsets, content hash and every loader error."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from carlos_ray.prompts import (
    Prompt,
    PromptSet,
    PromptSetError,
    load_prompt_set,
)
from carlos_ray.paths import REPO_ROOT, resolve_conf_path

INDEX = "conf/prompts/index_prompts.yaml"
CONTEXT = "conf/prompts/context_prompts.yaml"
STYLE_WORDS = re.compile(
    r"\b(photo|photograph|photography|painting|painted|drawing|sketch|illustration|render|rendered|cartoon|anime|"
    r"watercolor|oil|digital art|3d|pixel|style|artstation|portrait|cinematic|realistic|hdr|4k|8k)\b",
    re.IGNORECASE,
)


def norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the shipped files ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [INDEX, CONTEXT])
def test_shipped_file_shape(path: str) -> None:
    ps = load_prompt_set(path)
    raw = yaml.safe_load((REPO_ROOT / path).read_text())
    assert len(ps) == 280
    assert len(ps.categories) == 10
    assert list(ps.categories) == list(raw["categories"])
    for cat in ps.categories:
        assert ps.category_of_index.count(cat) == 28
    # ids are <category>-<NN>, 1-based, in file order: checked against the raw YAML independently.
    expected = [(f"{c}-{n + 1:02d}", c, t) for c, ts in raw["categories"].items() for n, t in enumerate(ts)]
    assert [(p.id, p.category, p.text) for p in ps.prompts] == expected
    assert len(set(ps.ids)) == 280
    for p in ps.prompts:
        assert 5 <= len(p.text.split()) <= 15, p
        assert not STYLE_WORDS.search(p.text), p
        assert p.text == p.text.strip() and not p.text.endswith((".", "!", "?")), p


def test_no_duplicate_texts_within_or_across_sets() -> None:
    p, q = load_prompt_set(INDEX), load_prompt_set(CONTEXT)
    assert len({norm(t) for t in p.texts}) == 280
    assert len({norm(t) for t in q.texts}) == 280
    assert not {norm(t) for t in p.texts} & {norm(t) for t in q.texts}
    assert p.name != q.name and p.content_hash() != q.content_hash()


@pytest.mark.parametrize("path", [INDEX, CONTEXT])
def test_shipped_subsets(path: str) -> None:
    ps = load_prompt_set(path)
    tiny = load_prompt_set(path, subset="tiny")
    assert len(tiny) == 5 and len(set(tiny.categories)) == 5
    small = load_prompt_set(path, subset="small")
    assert len(small) == 20
    assert all(small.category_of_index.count(c) == 2 for c in ps.categories)
    assert load_prompt_set(path, subset="full") == ps
    # a subset keeps the parent's order and its prompts are the parent's prompts
    positions = [ps.index_of(i) for i in small.ids]
    assert positions == sorted(positions)
    assert all(ps.prompts[ps.index_of(p.id)] == p for p in small.prompts)
    assert small.subset("tiny").ids == tiny.ids  # tiny is within small, so it carries over


def test_ids_stable_and_hash_stable_across_loads() -> None:
    a, b = load_prompt_set(INDEX), load_prompt_set(REPO_ROOT / INDEX)
    assert a == b and a.ids == b.ids
    assert a.content_hash() == b.content_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", a.content_hash())
    assert a.ids[0] == "people-01" and a.index_of("animals-07") == 28 + 6


def test_resolve_conf_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths no longer exist as given
    assert resolve_conf_path(INDEX) == REPO_ROOT / INDEX
    assert resolve_conf_path("prompts/index_prompts.yaml") == REPO_ROOT / INDEX
    local = write(tmp_path, "x")
    assert resolve_conf_path("prompts.yaml") == Path("prompts.yaml")  # as given wins
    assert resolve_conf_path(local) == local
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_conf_path("nope.yaml")


# --- content hash ---------------------------------------------------------------------------------


def test_content_hash_changes_with_any_text_and_ignores_name(tmp_path: Path) -> None:
    base = "name: t\nversion: 1\ncategories:\n  a: [one two, three four]\n  b: [five six]\n"
    h = load_prompt_set(write(tmp_path, base)).content_hash()
    assert load_prompt_set(write(tmp_path, base.replace("three four", "three five"))).content_hash() != h
    assert load_prompt_set(write(tmp_path, base.replace("name: t", "name: u"))).content_hash() == h
    # reordering within a category changes ids and hash; renaming a category too
    assert load_prompt_set(write(tmp_path, base.replace("[one two, three four]", "[three four, one two]"))).content_hash() != h
    assert load_prompt_set(write(tmp_path, base.replace("b: [", "c: ["))).content_hash() != h
    # independent recomputation of the documented definition
    payload = '[["a-01","a","one two"],["a-02","a","three four"],["b-01","b","five six"]]'
    assert h == hashlib.sha256(payload.encode()).hexdigest()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgh ", min_size=1, max_size=12).filter(str.strip), min_size=2, max_size=6, unique_by=norm),
       st.data())
def test_content_hash_detects_single_text_change(texts: list[str], data: st.DataObject) -> None:
    prompts = tuple(Prompt(f"c-{i + 1:02d}", "c", t) for i, t in enumerate(texts))
    ps = PromptSet("h", prompts)
    i = data.draw(st.integers(0, len(texts) - 1))
    changed = texts[i] + "z"
    if norm(changed) in {norm(t) for t in texts}:
        return
    other = PromptSet("h", prompts[:i] + (Prompt(prompts[i].id, "c", changed),) + prompts[i + 1:])
    assert other.content_hash() != ps.content_hash()
    assert PromptSet("h2", prompts).content_hash() == ps.content_hash()


# --- subsets by id ---------------------------------------------------------------------------------


def test_subset_by_ids() -> None:
    ps = load_prompt_set(INDEX)
    sub = ps.subset(["food-03", "people-02"])
    assert sub.ids == ("people-02", "food-03")  # parent order
    assert sub.categories == ("people", "food")
    assert sub.texts == (ps.prompts[1].text, ps.prompts[5 * 28 + 2].text)
    with pytest.raises(PromptSetError, match="food-99"):
        ps.subset(["food-99"])
    with pytest.raises(PromptSetError, match="more than once"):
        ps.subset(["food-01", "food-01"])
    with pytest.raises(KeyError, match="nope-01"):
        ps.index_of("nope-01")


# --- loader errors --------------------------------------------------------------------------------

GOOD = "name: t\nversion: '1'\ncategories:\n  a: [alpha one, alpha two]\n  b: [beta one]\nsubsets:\n  s: [a-01, b-01]\n"


def test_good_minimal_file(tmp_path: Path) -> None:
    ps = load_prompt_set(write(tmp_path, GOOD))
    assert ps.ids == ("a-01", "a-02", "b-01") and ps.version == "1"
    assert load_prompt_set(write(tmp_path, GOOD), subset="s").ids == ("a-01", "b-01")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_prompt_set(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\ncategories: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        (GOOD + "extra: 1\n", r"unknown top-level keys \['extra'\]"),
        (GOOD.replace("name: t\n", ""), "'name' must be a non-empty string"),
        (GOOD.replace("  b: [beta one]\n", "  b: []\n"), "category 'b' is empty"),
        (GOOD.replace("  b: [beta one]\n", "  b:\n"), "category 'b' is empty"),
        (GOOD.replace("  b: [beta one]\n", "  a: [gamma one]\n"), "duplicate key 'a'"),
        (GOOD.replace("beta one", "Alpha  ONE"), "duplicate prompt text .*'a-01' and 'b-01'"),
        (GOOD.replace("  b: [beta one]", "  Bad-Name: [beta one]"), "category name 'Bad-Name'"),
        (GOOD.replace("beta one", "''"), "prompt 1 of category 'b' must be a non-empty string"),
        (GOOD.replace("[a-01, b-01]", "[a-01, c-07]"), r"subset 's' names ids not in the prompt set: \['c-07'\]"),
        (GOOD.replace("[a-01, b-01]", "[a-01, a-01]"), "subset 's' lists ids more than once"),
        (GOOD.replace("  s:", "  full:"), "'full' is reserved"),
        (GOOD.replace("categories:\n  a: [alpha one, alpha two]\n  b: [beta one]\n", "categories: {}\n"), "'categories' must be"),
    ],
)
def test_loader_errors_name_file_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PromptSetError, match=message) as info:
        load_prompt_set(path)
    assert str(path) in str(info.value)


def test_unknown_subset_lists_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(PromptSetError, match=r"unknown subset 'tinny'.*\['full', 's'\]") as info:
        load_prompt_set(path, subset="tinny")
    assert str(path) in str(info.value)


def test_direct_construction_rejects_duplicate_ids() -> None:
    with pytest.raises(PromptSetError, match="duplicate prompt id 'a-01'"):
        PromptSet("x", (Prompt("a-01", "a", "one"), Prompt("a-01", "a", "two")))
