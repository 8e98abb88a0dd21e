"""`carlos-ray eval` and `carlos-ray eval-queries`: the evaluation from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _resources(config: str | None, manifest: Any):
    """Actor-pool resources: from --config, else from the config the index was built with (conf/<name>.yaml), else defaults."""
    from carlos_ray.config import Config, ResourcesSpec
    from carlos_ray.paths import find_conf_file

    if config:
        return Config.from_file(config).resources
    guess = find_conf_file(f"conf/{manifest.config_name}.yaml") if manifest.config_name else None
    return Config.from_file(guess).resources if guess is not None else ResourcesSpec()


def cmd_eval(args: argparse.Namespace) -> int:
    from carlos_ray.cli.common import EXIT_OK, UsageError
    from carlos_ray.evaluation.queries import QueryFileError, load_queries
    from carlos_ray.evaluation.report import write_outputs
    from carlos_ray.evaluation.run import JUDGES, EvalSpec, format_table, run_eval
    from carlos_ray.store import Index, IndexError_

    judges = [] if args.judge in ("", "none") else [j.strip() for j in args.judge.split(",") if j.strip()]
    bad = [j for j in judges if j not in JUDGES]
    if bad:
        raise UsageError(f"--judge: unknown judge(s) {bad}; valid: {', '.join(JUDGES)} (or 'none')")
    try:
        queries = load_queries(args.queries)
        manifest = Index(args.index).read_manifest()
    except (QueryFileError, IndexError_) as e:
        raise UsageError(str(e)) from None
    kw = {k: v for k, v in dict(heldout_prompts=args.heldout, heldout_subset=args.heldout_subset, num_seeds=args.seeds,
                                judge_k=args.judge_k, oracle=args.oracle).items() if v is not None}
    if args.retrievers:
        kw["retrievers"] = [r.strip() for r in args.retrievers.split(",") if r.strip()]
    try:
        spec = EvalSpec(judges=judges, **kw)
        result = run_eval(args.index, queries, spec, cache_dir=args.cache, resources=_resources(args.config, manifest),
                          device=args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    paths = write_outputs(result, args.out)
    print(format_table(result))
    print(f"\n{result['n_queries']} queries ({result['n_positive']} positive, {result['n_negative']} negative) over "
          f"{result['n_loras']} LoRAs in {result['seconds']['total']:.0f} s")
    print(f"report: {paths['html']}   results: {paths['json']}")
    return EXIT_OK


def cmd_eval_queries(args: argparse.Namespace) -> int:
    from carlos_ray.cli.common import EXIT_OK, UsageError
    from carlos_ray.evaluation.micro import micro_queries

    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").is_file():
        raise UsageError(f"{zoo} has no zoo.json (a micro zoo directory lists its members and planted behaviours there)")
    qs = micro_queries(zoo, seed=args.seed)
    qs.save(args.out)
    print(f"wrote {len(qs.queries)} queries ({len(qs.positives)} positive, {len(qs.negatives)} negative) to {args.out}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `eval` and `eval-queries` to the CLI's subcommands."""
    e = sub.add_parser("eval", help="the paper's evaluation: retrievers x queries -> label metrics and judges, on Ray")
    e.add_argument("--index", required=True, help="index directory or URI")
    e.add_argument("--queries", required=True, help="query file (JSON; `carlos-ray eval-queries` writes one for a micro zoo)")
    e.add_argument("--judge", default="oracle,clip", help="judges, comma-separated: oracle, clip, or 'none' (labels only)")
    e.add_argument("--out", default="eval_out", help="output directory: results.json, table.txt, chart.png, index.html")
    e.add_argument("--heldout", default=None, help="held-out prompt set (YAML) for judging, in neither P nor P'")
    e.add_argument("--heldout-subset", default=None, help="named subset of the held-out prompt set")
    e.add_argument("--seeds", type=int, default=None, help="held-out seeds per prompt (default 2)")
    e.add_argument("--judge-k", type=int, default=None, help="top LoRAs per query that generate images (default 3)")
    e.add_argument("--oracle", default=None, help="pixel oracle (default micro)")
    e.add_argument("--retrievers", default=None, help="comma-separated subset of the retrievers (default: all)")
    e.add_argument("--config", default=None, help="config whose actor-pool resources the judge pass uses")
    e.add_argument("--cache", default=None, help="judge cache directory (default: IDX/judge-cache)")
    e.add_argument("--device", default=None, help="torch device of the query encoder (default: the index's)")
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("eval-queries", help="write the evaluation queries of a micro zoo (from its zoo.json)")
    q.add_argument("zoo", help="micro zoo directory (with zoo.json)")
    q.add_argument("--out", required=True, help="query file to write (JSON)")
    q.add_argument("--seed", type=int, default=0, help="seed of the content words drawn for 'behaviour + content' queries")
    q.set_defaults(func=cmd_eval_queries)
