"""`carlos-ray demo`: the whole mission on the embedded tiny default, no network.

Writes the synthetic zoo (with hostile files beside it), indexes it through Ray Data, prints the
rejects, runs a few text queries and a more-like-this lookup, writes the report, and says how to
serve the index and how to run the same on a GPU cluster.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

DEMO_QUERIES = ("watercolor painting", "a crisp sharp look", "neon cyberpunk city at night")


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(workdir: Path, config: str = "conf/tiny.yaml") -> int:
    from carlos_ray.cli.common import rejects_table, table
    from carlos_ray.config import Config
    from carlos_ray.indexing import run_index
    from carlos_ray.lora.hostile import write_hostile_corpus
    from carlos_ray.zoo import make_zoo

    t0 = time.time()
    cfg = Config.from_file(config)
    workdir = Path(workdir)
    zoo, index, report = workdir / "zoo", workdir / "index", workdir / "report"
    for d in (zoo, index, report):
        if d.exists():
            shutil.rmtree(d)

    _say(f"[1/5] writing the synthetic LoRA zoo to {zoo}")
    members = make_zoo(zoo, n=12, seed=0)
    hostile = write_hostile_corpus(zoo / "untrusted")
    _say(f"      {len(members)} LoRAs with planted behavior (scale family, near-duplicate twins, a no-op, an erratic one, "
         f"a text-encoder LoRA, random styles) and {len(hostile)} hostile files beside them")

    _say(f"[2/5] indexing through Ray Data ({len(cfg.sampling.seeds)} seeds x the `{cfg.sampling.prompt_subset}` prompts, "
         f"tiny SDXL + tiny CLIP on CPU)")
    logging.getLogger("carlos_ray.indexing").setLevel(logging.INFO)
    summary = run_index(cfg, [str(zoo)], str(index))
    _say(f"      indexed {summary.indexed}, rejected {summary.rejected}, duplicates {summary.duplicates}, "
         f"images generated {summary.images_generated}, {summary.wall_seconds:.0f} s")
    _say("      rejected files and why:")
    _say(rejects_table(summary.rejects, 90))

    _say("[3/5] text queries (reciprocal CLIP text-diff vector, ranked by cosine to each LoRA's direction)")
    from carlos_ray.serving import load_query_encoder, load_ranker

    ranker, manifest = load_ranker(str(index))
    encoder = load_query_encoder(manifest)
    th = manifest.thresholds
    _say(f"      default filters ({th.get('source')}): max_strength={th.get('max_strength')}, "
         f"min_consistency={th.get('min_consistency')}")
    for q in DEMO_QUERIES:
        hits = ranker.search(encoder.encode_one(q), k=5)
        _say(f"\n      query: {q!r}")
        _say(table([{"rank": i + 1, "name": h.name, "score": f"{h.score:.3f}", "strength": f"{h.strength:.3f}",
                      "consistency": f"{h.consistency:.3f}"} for i, h in enumerate(hits)],
                    ["rank", "name", "score", "strength", "consistency"]))

    _say("\n[4/5] more like this: the LoRAs closest in direction to `twin_a` (its near-duplicate should lead)")
    sig = ranker_table_row(ranker, "Twin A")
    hits = ranker.similar(sig, k=4, max_strength=float("inf"), min_consistency=float("-inf"))
    _say(table([{"rank": i + 1, "name": h.name, "cosine": f"{h.score:.4f}", "strength": f"{h.strength:.3f}"}
                 for i, h in enumerate(hits)], ["rank", "name", "cosine", "strength"]))

    _say(f"\n[5/5] writing the report to {report}")
    from carlos_ray.report import build_report

    page = build_report(str(index), str(report))
    _say(f"      open {page}")

    _say(f"\ndone in {time.time() - t0:.0f} s. Next:")
    _say(f"  serve it:    carlos-ray serve --index {index}    (then: curl 'http://127.0.0.1:8000/search?q=watercolor&k=5')")
    _say(f"  query it:    carlos-ray query --index {index} \"watercolor painting\" -k 5")
    _say("  on a GPU cluster with the paper's models (SDXL base 1.0 + ViT-B/32 openai):")
    _say("    ray job submit --address http://HEAD:8265 --working-dir . -- \\")
    _say("      python jobs/index.py --config conf/paper.yaml --loras /data/loras --index s3://bucket/carlos-index")
    return 0


def ranker_table_row(ranker, name: str) -> str:
    """lora_id of the LoRA with this display name."""
    for lid in ranker.ids:
        if ranker.get(lid).get("name") == name:
            return lid
    raise KeyError(f"no LoRA named {name!r} in the index")


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.workdir), config=args.config)


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the whole mission on the embedded tiny default, no network")
    d.add_argument("--workdir", default="demo_out", help="where the zoo, index and report are written")
    d.add_argument("--config", default="conf/tiny.yaml")
    d.set_defaults(func=cmd_demo)
