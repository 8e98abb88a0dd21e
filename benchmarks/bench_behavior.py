"""Tags, groups and duplicates: cost at 100K synthetic signatures, and what they find in the 740 real ones.

Part 1 (synthetic, d = 512): ``--n`` directions (default 100,000) around 300 planted behaviours
(lognormal strengths, 1% planted near-duplicate pairs, and 3-member scale families), a
369-word vocabulary of random tag vectors, one of them the component every direction shares (the paper vocabulary's size; the real vectors need the
index's text encoder). Per stage: wall time and peak traced memory (tracemalloc, numpy buffers
included) and quality against the planted truth (top-1 tag, ARI of groups, duplicate pairs found).
In the same run the blocked duplicate scan is compared with the plain full similarity matrix at
``--naive-n`` rows (default 10,000; the full matrix at 100K would need 40 GB).

Part 2 (real): the 740 published SDXL signatures (``carlos==0.0.3``): the top behavioural duplicate
pairs, the scale families and the largest groups, with their Civitai names, and how many duplicate
pairs share a name stem (definition printed). Tags are not computed there: the index has no text
encoder on this machine (ViT-B/32 weights cannot be downloaded).

Part 3 (``--zoo-index DIR --zoo-json zoo.json``): the issue's targets on an index of the micro zoo
(top-1 tag per calibration, groups ARI, planted duplicate pairs, scale family); the calibration with
the best top-1 is the one stored in the index.

    python benchmarks/bench_behavior.py [--quick] [--out results.json] [--zoo-index DIR --zoo-json FILE [--zoo-only]]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carlos_ray.behavior.duplicates import NAME_STEM_DEFINITION, DuplicateCriteria, behavioural_duplicates, name_stem  # noqa: E402
from carlos_ray.behavior.groups import group_directions  # noqa: E402
from carlos_ray.behavior.tags import CALIBRATIONS, assign_tags, tag_statistics  # noqa: E402
from carlos_ray.ranker import PAPER_MAX_STRENGTH, PAPER_MIN_CONSISTENCY  # noqa: E402
from carlos_ray.reference import read_reference  # noqa: E402

CACHE_DIR = Path.home() / ".cache" / "carlos-ray"
WHEEL = CACHE_DIR / "carlos-0.0.3-py3-none-any.whl"
N_TAGS = 369
N_BEHAVIOURS = 300
DIM = 512


def reference_wheel() -> Path:
    """The published wheel in ~/.cache/carlos-ray, downloaded with pip on first use."""
    import subprocess

    if not WHEEL.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.9",
                        "--only-binary=:all:", "carlos==0.0.3", "-d", str(CACHE_DIR)], check=True)
    return WHEEL


def measured(fn, *args, **kwargs):
    """(result, seconds, peak traced MB) of one call."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


def synthetic(n: int, seed: int):
    """Directions around planted behaviours; each behaviour is a tag vector plus a shared generic component."""
    rng = np.random.default_rng(seed)
    tags = rng.standard_normal((N_TAGS, DIM)).astype(np.float32)
    generic = rng.standard_normal(DIM).astype(np.float32)
    tags[0] = generic  # a word that moves every LoRA's features alike ("highly detailed"): raw cosine favours it
    behaviour_tag = rng.choice(np.arange(1, N_TAGS), size=N_BEHAVIOURS, replace=False)
    planted = rng.integers(0, N_BEHAVIOURS, n)
    x = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, 8192):
        b = planted[s : s + 8192]
        x[s : s + 8192] = tags[behaviour_tag[b]] + 1.2 * generic + 0.5 * rng.standard_normal((b.size, DIM)).astype(np.float32)
    strength = rng.lognormal(np.log(5.8), 0.35, n)
    n_dup = n // 100
    a = rng.choice(n // 2, size=n_dup, replace=False)
    b = a + n // 2  # planted near-duplicates: b copies a with tiny noise, strength within 5%
    x[b] = x[a] + 0.01 * rng.standard_normal((n_dup, DIM)).astype(np.float32) * np.linalg.norm(x[a], axis=1, keepdims=True) / np.sqrt(DIM)
    strength[b] = strength[a] * rng.uniform(0.97, 1.03, n_dup)
    planted[b] = planted[a]
    n_fam = max(1, n // 10_000)
    fam_rows = rng.choice(np.setdiff1d(np.arange(n), np.r_[a, b]), size=3 * n_fam, replace=False).reshape(n_fam, 3)
    for f in fam_rows:  # a scale family: one direction at strengths x1, x2, x4
        x[f] = x[f[0]] * np.array([[1.0], [2.0], [4.0]], dtype=np.float32)
        strength[f] = strength[f[0]] * np.array([1.0, 2.0, 4.0])
        planted[f] = planted[f[0]]
    return x, strength, tags, behaviour_tag[planted], planted, set(zip(a.tolist(), b.tolist())), fam_rows


def naive_duplicates(x: np.ndarray, strength: np.ndarray, min_cos: float, min_ratio: float) -> set:
    """The plain way: the full N×N cosine matrix, then the same two conditions."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    i, j = np.nonzero(np.triu(c >= min_cos, 1))
    r = np.minimum(strength[i], strength[j]) / np.maximum(strength[i], strength[j])
    keep = r >= min_ratio
    return set(zip(i[keep].tolist(), j[keep].tolist()))


def part_synthetic(n: int, naive_n: int, seed: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    x, strength, tags, true_tag, planted, dup_pairs, fam_rows = synthetic(n, seed)
    rows, out = [], {"n": n, "dim": DIM, "tags": N_TAGS, "behaviours": N_BEHAVIOURS}

    stats, dt, mb = measured(tag_statistics, x, tags)
    rows.append(("tag statistics (per-tag mean/std)", dt, mb, ""))
    out["tag_statistics"] = {"seconds": dt, "peak_mb": mb}
    out["tagging"] = {}
    for cal in CALIBRATIONS:
        res, dt, mb = measured(assign_tags, x, tags, calibration=cal, stats=stats)
        acc = float((res.top1 == true_tag).mean())
        rows.append((f"tag {n:,} LoRAs ({cal})", dt, mb, f"top-1 = planted tag {acc:.3f}"))
        out["tagging"][cal] = {"seconds": dt, "peak_mb": mb, "top1_accuracy": acc}

    g, dt, mb = measured(group_directions, x, seed=seed, sample_size=3000)
    ari = float(adjusted_rand_score(planted, g.labels))
    rows.append((f"group {n:,} (sample 3000, assign rest)", dt, mb, f"{g.n_groups} groups, ARI {ari:.3f}"))
    out["grouping"] = {"seconds": dt, "peak_mb": mb, "groups": g.n_groups, "ari": ari, "method": g.method,
                       "silhouette": g.silhouette}

    rep, dt, mb = measured(behavioural_duplicates, x, strength, DuplicateCriteria(0.95, 0.8))
    found = {(p.a, p.b) for p in rep.pairs}
    recall = len(found & dup_pairs) / len(dup_pairs)
    fam_found = sum(any(set(f.tolist()) <= set(fam.members) for fam in rep.families) for f in fam_rows)
    rows.append((f"duplicates {n:,} (blocked scan)", dt, mb,
                 f"{len(found)} pairs, planted recall {recall:.3f}, {fam_found}/{len(fam_rows)} families"))
    out["duplicates"] = {"seconds": dt, "peak_mb": mb, "pairs": len(found), "planted_pairs": len(dup_pairs),
                         "planted_recall": recall, "families_found": fam_found, "families_planted": len(fam_rows)}

    m = min(naive_n, n)
    sub = np.arange(m)
    (blocked, dtb, mbb) = measured(behavioural_duplicates, x[sub], strength[sub], DuplicateCriteria(0.95, 0.8))
    naive, dtn, mbn = measured(naive_duplicates, x[sub], strength[sub], 0.95, 0.8)
    same = {(p.a, p.b) for p in blocked.pairs} == naive
    rows.append((f"duplicates {m:,}: blocked", dtb, mbb, f"same pairs as full matrix: {same}"))
    rows.append((f"duplicates {m:,}: full N×N matrix", dtn, mbn, f"memory ratio {mbn / mbb:.1f}x"))
    out["blocked_vs_full"] = {"n": m, "blocked_seconds": dtb, "blocked_peak_mb": mbb, "full_seconds": dtn,
                              "full_peak_mb": mbn, "same_pairs": same, "memory_ratio": mbn / mbb}

    print(f"\n## Synthetic: {n:,} signatures, d = {DIM}, {N_TAGS} tags, {N_BEHAVIOURS} planted behaviours\n")
    print("| stage | seconds | peak MB | quality |")
    print("| --- | ---: | ---: | --- |")
    for name, dt, mb, q in rows:
        print(f"| {name} | {dt:.2f} | {mb:.0f} | {q} |")
    return out


def part_real(top: int, min_cosine: float, min_ratio: float) -> dict:
    table, _ = read_reference(reference_wheel())
    x = np.array(table["direction"].to_pylist(), dtype=np.float64)
    s = table["strength"].to_numpy()
    c = table["consistency"].to_numpy()
    names = [n or lid for n, lid in zip(table["name"].to_pylist(), table["lora_id"].to_pylist())]
    ids = table["lora_id"].to_pylist()
    inside = (s <= PAPER_MAX_STRENGTH) & (c >= PAPER_MIN_CONSISTENCY)
    out: dict = {"n": len(names), "min_cosine": min_cosine, "min_strength_ratio": min_ratio}

    rep = behavioural_duplicates(x, s, DuplicateCriteria(min_cosine, min_ratio))
    identical = [p for p in rep.pairs if np.array_equal(x[p.a], x[p.b])]
    print(f"\n## Real: {len(names)} published SDXL signatures (carlos==0.0.3)\n")
    print(f"Behavioural duplicates (cosine >= {min_cosine}, strength ratio >= {min_ratio}): {len(rep.pairs)} pairs, "
          f"{len(identical)} of them with bit-identical directions; {len(rep.families)} scale families.\n")
    print("| # | score | cosine | strength ratio | same stem | LoRA a | LoRA b |")
    print("| ---: | ---: | ---: | ---: | :---: | --- | --- |")
    pairs = []
    for k, p in enumerate(rep.pairs[:top], 1):
        st = bool(name_stem(names[p.a])) and name_stem(names[p.a]) == name_stem(names[p.b])
        print(f"| {k} | {p.score:.3f} | {p.cosine:.3f} | {p.strength_ratio:.2f} | {'yes' if st else ''} | "
              f"{names[p.a][:60]} ({ids[p.a]}) | {names[p.b][:60]} ({ids[p.b]}) |")
        pairs.append({"a": ids[p.a], "b": ids[p.b], "name_a": names[p.a], "name_b": names[p.b], "score": p.score,
                      "cosine": p.cosine, "strength_ratio": p.strength_ratio, "same_stem": st})
    same_stem = sum(bool(name_stem(names[p.a])) and name_stem(names[p.a]) == name_stem(names[p.b]) for p in rep.pairs)
    same_name = sum(names[p.a].strip().lower() == names[p.b].strip().lower() for p in rep.pairs)
    print(f"\n{same_stem} of {len(rep.pairs)} duplicate pairs share a name stem ({same_name} have the same name).")
    print(f"Definition: {NAME_STEM_DEFINITION}.")
    out.update({"pairs": len(rep.pairs), "identical_direction_pairs": len(identical), "top_pairs": pairs,
                "pairs_same_stem": same_stem, "pairs_same_name": same_name, "name_stem_definition": NAME_STEM_DEFINITION})

    print("\nScale families (parallel directions, strengths spanning more than 1 / ratio):\n")
    fams = []
    for f in rep.families[:top]:
        print(f"- {' < '.join(f'{names[m][:40]} ({s:.2f})' for m, s in zip(f.members, f.strengths))}; min cosine {f.min_cosine:.3f}")
        fams.append({"members": [ids[m] for m in f.members], "names": [names[m] for m in f.members], "strengths": f.strengths})
    out["families"] = fams

    t0 = time.perf_counter()
    g = group_directions(x, include=inside, seed=0)
    dt = time.perf_counter() - t0
    sizes = np.bincount(g.labels[g.labels >= 0])
    print(f"\nGroups of the {int(inside.sum())} LoRAs inside the paper thresholds: {g.n_groups} groups "
          f"({int((sizes >= 2).sum())} with 2+ members, {int((sizes == 1).sum())} singletons), {g.method}, "
          f"silhouette {g.silhouette:.3f}, {dt:.1f} s\n")
    print("| group | size | cohesion | members (first 5) |")
    print("| ---: | ---: | ---: | --- |")
    groups = []
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for k in range(min(top, g.n_groups)):
        mem = g.members(k)
        cohesion = float((u[mem] @ g.centroids[k].astype(np.float64)).mean())
        print(f"| {k} | {mem.size} | {cohesion:.2f} | {'; '.join(names[m][:40] for m in mem[:5])} |")
        groups.append({"group": k, "size": int(mem.size), "cohesion": cohesion, "members": [ids[m] for m in mem],
                       "names": [names[m] for m in mem]})
    out["groups"] = {"n_groups": g.n_groups, "method": g.method, "silhouette": g.silhouette, "seconds": dt,
                     "multi_member": int((sizes >= 2).sum()), "top": groups}
    return out


def part_zoo(index_uri: str, zoo_json: Path) -> dict:
    """The issue's targets on an index of the micro zoo, every tag calibration compared; tags stored with the best."""
    from carlos_ray.behavior.index import evaluate_index, tag_index
    from carlos_ray.serving.loading import load_query_encoder

    summary = tag_index(index_uri, vocabulary="micro", load_encoder=load_query_encoder)  # computes (or reuses) the tag vectors with the index's encoder
    res = evaluate_index(index_uri, json.loads(Path(zoo_json).read_text()), vocabulary="micro")
    print(f"\n## Micro zoo: {summary['loras']} LoRAs, {res['behaviour_loras']} with a planted behaviour\n")
    print("| measure | value | target | met |")
    print("| --- | ---: | ---: | :---: |")
    for cal in res["tags"]:
        print(f"| top-1 tag = planted ({cal}) | {res['tags'][cal]['top1_accuracy']:.3f} | >= 0.9 | "
              f"{'yes' if res['tags'][cal]['top1_accuracy'] >= 0.9 else 'no'} |")
    print(f"| groups ARI vs planted | {res['groups']['ari']:.3f} | >= 0.8 | {'yes' if res['targets']['ari'] else 'no'} |")
    d = res["duplicates"]
    print(f"| planted near-duplicate pairs found | {d['planted_found']}/{d['planted_pairs']} | all | "
          f"{'yes' if d['planted_found'] == d['planted_pairs'] else 'no'} |")
    print(f"| different-behaviour pairs called duplicates | {len(d['different_behaviour_pairs'])} | 0 | "
          f"{'yes' if not d['different_behaviour_pairs'] else 'no'} |")
    print(f"| scale families reported as one | {d['scale_families_found']}/{d['scale_families_planted']} | all | "
          f"{'yes' if res['targets']['scale_family'] else 'no'} |")
    print(f"\nChosen calibration (best top-1): {res['calibration']}")
    if res["calibration"] != summary["calibration"]:
        tag_index(index_uri, vocabulary="micro", calibration=res["calibration"], load_encoder=load_query_encoder)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 synthetic signatures (< 1 min)")
    parser.add_argument("--n", type=int, default=100_000, help="synthetic signatures")
    parser.add_argument("--naive-n", type=int, default=10_000, help="rows of the blocked-vs-full duplicate comparison")
    parser.add_argument("--top", type=int, default=20, help="real pairs / groups to print")
    parser.add_argument("--min-cosine", type=float, default=0.9, help="duplicate cosine on the real signatures")
    parser.add_argument("--min-strength-ratio", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--zoo-index", default=None, help="an index of the micro zoo: measure the issue's targets on it")
    parser.add_argument("--zoo-json", type=Path, default=None, help="the zoo's zoo.json (ground truth)")
    parser.add_argument("--zoo-only", action="store_true", help="only the micro-zoo measurement")
    args = parser.parse_args()
    n, naive_n = (5_000, 2_000) if args.quick else (args.n, args.naive_n)
    result = {"machine": {"python": platform.python_version(), "platform": platform.platform()}}
    if (args.zoo_index is None) != (args.zoo_json is None):
        parser.error("--zoo-index and --zoo-json go together")
    if not args.zoo_only:
        result["synthetic"] = part_synthetic(n, naive_n, args.seed)
        result["real"] = part_real(args.top, args.min_cosine, args.min_strength_ratio)
    if args.zoo_index:
        result["zoo"] = part_zoo(args.zoo_index, args.zoo_json)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS {result['max_rss_mb']:.0f} MB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
