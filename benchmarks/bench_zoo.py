"""The micro zoo's ground truth, measured: per-LoRA effect by the pixel oracle, and retrieval by behaviour word.

1. Effect. Every LoRA of the shipped zoo generates the held-out prompts (conf/prompts/micro_heldout_prompts.yaml,
   in neither the index set P nor the context set P') at several seeds, with the micro SDXL, exactly as the
   indexer would (same sampling settings, trigger words appended). The pixel oracle judges each image and its
   base twin (same prompt and seed, no LoRA): the fraction showing the LoRA's planted attribute with and
   without it, the fraction whose oracle reading changed at all, and the mean pixel change.
2. Retrieval. On the demo index (built here from the shipped zoo with conf/micro.yaml if --index is
   missing), `query WORD -k 1` for every style word: top-1, its score, and the rank of the best LoRA
   planted with that word (ranking with the index's default filters; "-" = filtered out).

    python benchmarks/bench_zoo.py --out bench_results/zoo.json [--index demo_out/index] [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    out = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


def planted_hit(member: dict, judged: dict) -> bool:
    """Whether one oracle reading shows the member's planted attribute."""
    kind, _, name = member["behaviour"].partition(":")
    if kind == "style":
        return name in judged["styles"]
    if kind == "content":
        from carlos_ray.world.render import CONTENT_BEHAVIOURS

        attr, value = next(iter(CONTENT_BEHAVIOURS[name].items()))
        if attr == "size":  # the oracle reads no size: use the object's area
            return False
        return judged[attr] == value
    if kind == "overpowering":
        from carlos_ray.world.zoo_train import OVERPOWERING_SCENE

        return judged["shape"] == OVERPOWERING_SCENE["shape"] and judged["colour"] == OVERPOWERING_SCENE["colour"]
    return False  # erratic / noop: no single attribute; see `changed`


def _reading(j: dict) -> tuple:
    return tuple(j["styles"]), j["shape"], j["colour"], j["background"]


def measure_effects(config: str, seeds: int, zoo_dir: str | None = None) -> tuple[list[dict], dict]:
    from carlos_ray.config import Config
    from carlos_ray.models.generator import SDXLGenerator
    from carlos_ray.prompts import load_prompt_set
    from carlos_ray.world.oracle import judge
    from carlos_ray.world.zoo_spec import shipped_zoo_dir

    cfg = Config.from_file(config)
    zoo = Path(zoo_dir) if zoo_dir else shipped_zoo_dir()
    members = json.loads((zoo / "zoo.json").read_text())["members"]
    held = load_prompt_set("conf/prompts/micro_heldout_prompts.yaml")
    index_prompts = {p.text for p in load_prompt_set(cfg.sampling.prompts).prompts}
    prompts = [p.text for p in held.prompts if p.text not in index_prompts]
    seed_list = list(range(1000, 1000 + seeds))
    pp = [p for p in prompts for _ in seed_list]
    ss = [s for _ in prompts for s in seed_list]
    gen = SDXLGenerator(cfg.generator, cfg.generator.resolution)
    t0 = time.time()
    base, _ = gen.generate(pp, ss)
    base_j = [judge(im) for im in base]
    rows = []
    for m in members:
        words = m["trigger_words"]
        lp = [p + cfg.sampling.trigger_joiner + ", ".join(words) for p in pp] if words and cfg.sampling.trigger_words == "append" else pp
        gen.activate(m["name"], str(zoo / m["file"]))
        imgs, finite = gen.generate(lp, ss)
        gen.activate(None)
        lj = [judge(im) for im in imgs]
        with_ = np.mean([planted_hit(m, j) for j in lj])
        without = np.mean([planted_hit(m, j) for j in base_j])
        changed = np.mean([_reading(a) != _reading(b) for a, b in zip(lj, base_j)])
        pix = float(np.abs(imgs.astype(np.int16) - base.astype(np.int16)).mean())
        distinct = len({_reading(j) for j in lj})
        rows.append({"name": m["name"], "role": m["role"], "behaviour": m["behaviour"], "scale": m["scale"],
                     "with": round(float(with_), 3), "without": round(float(without), 3),
                     "effect": round(float(with_ - without), 3), "changed": round(float(changed), 3),
                     "pixel_change": round(pix, 2), "distinct_readings": distinct, "finite": bool(finite.all())})
        print(f"  {m['name']:<26} {m['behaviour']:<18} with {with_:.2f} without {without:.2f} changed {changed:.2f} "
              f"pixel {pix:6.2f}", file=sys.stderr, flush=True)
    info = {"prompts": len(prompts), "seeds": seeds, "images_per_lora": len(pp), "seconds": round(time.time() - t0, 1),
            "base_distinct_readings": len({_reading(j) for j in base_j})}
    return rows, info


def measure_queries(index: str, config: str, zoo_dir: str | None = None) -> tuple[list[dict], dict]:
    from carlos_ray.serving import load_query_encoder, load_ranker
    from carlos_ray.world.render import STYLES
    from carlos_ray.world.zoo_spec import shipped_zoo_dir

    zoo = Path(zoo_dir) if zoo_dir else shipped_zoo_dir()
    if not Path(index).exists():
        from carlos_ray.config import Config
        from carlos_ray.indexing import run_index

        print(f"building the index {index} from {zoo} with {config}", file=sys.stderr, flush=True)
        run_index(Config.from_file(config), [str(zoo)], index)
    members = {m["sha256"]: m for m in json.loads((zoo / "zoo.json").read_text())["members"]}
    ranker, manifest = load_ranker(index)
    encoder = load_query_encoder(manifest)
    n = len(ranker.ids)
    rows = []
    for word in STYLES:
        hits = ranker.search(encoder.encode_one(word), k=n)
        names = [members.get(ranker.get(h.lora_id)["sha256"], {}).get("name", "?") for h in hits]
        planted = {m["name"] for m in members.values() if m["planted"] == word}
        rank = next((i + 1 for i, nm in enumerate(names) if nm in planted), None)
        top = hits[0] if hits else None
        rows.append({"word": word, "top1": names[0] if names else "-", "score": f"{top.score:.3f}" if top else "-",
                     "planted": ",".join(sorted(planted)), "planted_rank": rank if rank else "-",
                     "correct": bool(names and names[0] in planted)})
    th = dict(manifest.thresholds or {})
    info = {"index": index, "loras": n, "thresholds": th,
            "top1_accuracy": round(sum(r["correct"] for r in rows) / len(rows), 3)}
    return rows, info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="conf/micro.yaml")
    p.add_argument("--index", default="demo_out/index", help="the demo index (built from the shipped zoo if missing)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--zoo", default=None, help="a micro zoo directory with zoo.json (default: the shipped zoo)")
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    p.add_argument("--skip-effects", action="store_true")
    p.add_argument("--skip-queries", action="store_true")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    result: dict = {}
    if not args.skip_effects:
        rows, info = measure_effects(args.config, args.seeds, args.zoo)
        print(f"\nPer-LoRA effect on held-out prompts ({info['prompts']} prompts x {info['seeds']} seeds; oracle fraction "
              f"showing the planted attribute with / without the LoRA)")
        print(_table(rows, ["name", "role", "behaviour", "scale", "with", "without", "effect", "changed", "pixel_change",
                            "distinct_readings"]))
        result["effects"] = {"rows": rows, **info}
    if not args.skip_queries:
        rows, info = measure_queries(args.index, args.config, args.zoo)
        print(f"\nquery WORD -k 1 on {info['index']} ({info['loras']} LoRAs, filters {info['thresholds']}): "
              f"top-1 accuracy {info['top1_accuracy']:.2f}")
        print(_table(rows, ["word", "top1", "score", "planted", "planted_rank"]))
        result["queries"] = {"rows": rows, **info}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
