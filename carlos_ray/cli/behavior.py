"""`carlos-ray tags | groups | duplicates`: what LoRAs do, from their signatures (in-process, same bodies as HTTP)."""

from __future__ import annotations

import argparse
import json
import sys

from carlos_ray.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, table as _table


def _service(index: str):
    from carlos_ray.serving import RankerService
    from carlos_ray.serving.watcher import load_fixed_index
    from carlos_ray.store import IndexError_

    try:
        return RankerService(load_fixed_index(index))
    except (IndexError_, ValueError) as e:
        raise UsageError(str(e)) from None


def _usage(e: Exception) -> UsageError:
    return UsageError(getattr(e, "detail", str(e)))


def cmd_tags(args: argparse.Namespace) -> int:
    from carlos_ray.behavior.index import tag_index
    from carlos_ray.behavior.tags import CALIBRATIONS, DEFAULT_CALIBRATION
    from carlos_ray.serving import EncoderUnavailable, ServiceError
    from carlos_ray.serving.loading import load_query_encoder

    if args.calibration is not None and args.calibration not in CALIBRATIONS:
        raise UsageError(f"--calibration must be one of {list(CALIBRATIONS)}, got {args.calibration!r}")
    service = _service(args.index)
    state = service.watcher.state
    stored = state.behavior.tagging or {}
    wanted = {"vocabulary": args.vocabulary or stored.get("vocabulary"), "calibration": args.calibration or stored.get("calibration")}
    if args.recompute or not state.behavior.tagged or any(v and v != stored.get(k) for k, v in wanted.items()):
        settings = {k: v for k, v in (("max_tags", args.max_tags), ("z_min", args.z_min), ("margin", args.margin),
                                                   ("min_shift", args.min_shift)) if v is not None}
        try:
            summary = tag_index(args.index, vocabulary=wanted["vocabulary"], calibration=wanted["calibration"] or DEFAULT_CALIBRATION,
                                load_encoder=lambda m: load_query_encoder(m, device=args.device, allow_download=args.allow_download),
                                **settings)
        except EncoderUnavailable as e:
            print(f"carlos-ray: error: cannot encode text queries for this index: {e}", file=sys.stderr)
            return EXIT_REJECTED
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(f"tagged {summary['tagged']} of {summary['loras']} LoRAs ({summary['vocabulary']} vocabulary, "
              f"{summary['calibration']}; tag vectors {'from the cache' if summary['vectors_cached'] else 'computed'}); "
              f"index version {summary['index_version']}", file=sys.stderr)
        service = _service(args.index)
    try:
        if args.lora_ids:
            out = [service.get(i) for i in args.lora_ids]
            rows = [{"lora_id": o["lora_id"], "name": (o["signature"].get("name") or "")[:40],
                     "tags": ", ".join(f"{t['tag']} ({t['score']:.2f})" for t in o["tags"] or [])} for o in out]
            body = [{"lora_id": o["lora_id"], "tags": o["tags"]} for o in out]
        else:
            body = service.tags()
            rows = [{"tag": t["tag"], "loras": t["loras"]} for t in body["tags"]]
    except ServiceError as e:
        raise _usage(e) from None
    if args.json:
        print(json.dumps(body, ensure_ascii=False))
    elif args.lora_ids:
        print(_table(rows, ["lora_id", "name", "tags"]))
    else:
        print(f"{body['tagged_loras']} LoRAs tagged ({body['vocabulary']} vocabulary, calibration {body['calibration']}):")
        print(_table(rows, ["tag", "loras"]) if rows else "(no LoRA has a tag)")
    return EXIT_OK


def cmd_groups(args: argparse.Namespace) -> int:
    from carlos_ray.behavior.api import check_positive
    from carlos_ray.serving import ServiceError

    try:
        min_size = check_positive("min_size", args.min_size, 100_000)
        limit = check_positive("limit", args.limit, 10_000)
        body = _service(args.index).groups(min_size, limit)
    except ServiceError as e:
        raise _usage(e) from None
    if args.json:
        print(json.dumps(body, ensure_ascii=False))
        return EXIT_OK
    print(f"{body['n_groups']} groups of {body['grouped']} LoRAs ({body['ungrouped']} outside the thresholds or without a "
          f"direction); {body['method']}; silhouette {body['silhouette'] if body['silhouette'] is None else round(body['silhouette'], 3)}")
    rows = [{"group": g["group"], "size": g["size"], "cohesion": f"{g['cohesion']:.2f}",
             "tags": ", ".join(t["tag"] for t in g["tags"]),
             "members": "; ".join((m["name"] or m["lora_id"])[:30] for m in g["members"][:4]) + (" ..." if g["size"] > 4 else "")}
            for g in body["groups"]]
    print(_table(rows, ["group", "size", "cohesion", "tags", "members"]) if rows else "(no group of that size)")
    return EXIT_OK


def cmd_duplicates(args: argparse.Namespace) -> int:
    from carlos_ray.behavior.api import check_duplicate_thresholds
    from carlos_ray.serving import ServiceError

    try:
        mc, mr = check_duplicate_thresholds(args.min_cosine, args.min_strength_ratio)
    except ServiceError as e:
        raise _usage(e) from None
    service = _service(args.index)
    if args.lora_id:
        try:
            body = service.duplicates(args.lora_id, mc, mr)
        except ServiceError as e:
            raise _usage(e) from None
        if args.json:
            print(json.dumps(body, ensure_ascii=False))
            return EXIT_OK
        for p in body["exact_copies"]:
            print(f"exact copy (same SHA-256, indexed once): {p}")
        for title, key in (("behavioural duplicates", "duplicates"), ("scale relatives (same effect, other strength or a looser variant)", "scale_relatives")):
            rows = [{**d, "name": (d["name"] or "")[:40], "score": f"{d['score']:.3f}", "cosine": f"{d['cosine']:.3f}",
                     "strength_ratio": f"{d['strength_ratio']:.2f}"} for d in body[key]]
            rule = (f"cosine >= {mc:g}, strength ratio >= {mr:g}" if key == "duplicates"
                    else f"cosine >= {body['family_min_cosine']:g}, not a duplicate")
            print(f"{title} of {args.lora_id} ({rule}):")
            print(_table(rows, ["lora_id", "score", "cosine", "strength_ratio", "name"]) if rows else "(none)")
        return EXIT_OK
    view = service.watcher.state.behavior
    rep = view.all_duplicates(mc, mr)
    names = view.names
    pairs = [{"a": view.ids[p.a], "b": view.ids[p.b], "name_a": names[p.a], "name_b": names[p.b], "score": p.score,
              "cosine": p.cosine, "strength_ratio": p.strength_ratio} for p in rep.pairs]
    families = [{"members": [view.ids[m] for m in f.members], "names": [names[m] for m in f.members],
                 "strengths": f.strengths, "min_cosine": f.min_cosine} for f in rep.families]
    exact = [{"lora_id": lid, "copies": paths} for lid, paths in sorted(view.aliases.items())]
    if args.json:
        print(json.dumps({"index_version": service.version(), "min_cosine": mc, "min_strength_ratio": mr,
                          "family_min_cosine": view.family_cosine(mc), "pairs": pairs,
                          "scale_families": families, "exact_duplicates": exact}, ensure_ascii=False))
        return EXIT_OK
    for e in exact:
        print(f"exact duplicates of {e['lora_id']} (indexed once): {', '.join(e['copies'])}")
    rows = [{"a": p["a"], "b": p["b"], "score": f"{p['score']:.3f}", "cosine": f"{p['cosine']:.3f}",
             "strength_ratio": f"{p['strength_ratio']:.2f}", "name_a": (p["name_a"] or "")[:30], "name_b": (p["name_b"] or "")[:30]}
            for p in pairs[: args.limit]]
    print(f"{len(pairs)} behavioural duplicate pairs (cosine >= {mc}, strength ratio >= {mr}):")
    print(_table(rows, ["a", "b", "score", "cosine", "strength_ratio", "name_a", "name_b"]) if rows else "(none)")
    print(f"{len(families)} scale families (same direction, different strength):")
    for f in families:
        print("  " + " < ".join(f"{(n or m)[:30]} ({s:.3g})" for m, n, s in zip(f["members"], f["names"], f["strengths"])))
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tags", help="behavioural tags: compute them once per index (needs its text encoder), then list them")
    t.add_argument("lora_ids", nargs="*", help="show these LoRAs' tags (default: every tag in use, with counts)")
    t.add_argument("--index", required=True, help="index directory or URI")
    t.add_argument("--vocabulary", default=None, help="tag vocabulary: a profile name (paper, micro) or a YAML file "
                   "(default: the index's profile, else paper)")
    t.add_argument("--calibration", default=None, help="centered (default), zscore, rank or margin")
    t.add_argument("--max-tags", type=int, default=None, help="most tags per LoRA (default 3)")
    t.add_argument("--min-shift", type=float, default=None,
                   help="centered: smallest cosine above the tag's index mean that makes a tag (default 0.2)")
    t.add_argument("--z-min", type=float, default=None, help="zscore: smallest z-score that makes a tag (default 2)")
    t.add_argument("--margin", type=float, default=None, help="margin: cosine above the LoRA's median tag (default 0.1)")
    t.add_argument("--recompute", action="store_true", help="tag again even if the index has tags")
    t.add_argument("--device", default=None, help="torch device of the text encoder (default: the index's)")
    t.add_argument("--allow-download", action="store_true", help="let the encoder download missing pretrained weights")
    t.add_argument("--json", action="store_true", help="JSON (the HTTP API's GET /tags body)")
    t.set_defaults(func=cmd_tags)

    g = sub.add_parser("groups", help="content groups: LoRAs whose directions point the same way")
    g.add_argument("--index", required=True, help="index directory or URI")
    g.add_argument("--min-size", type=int, default=2, help="only groups with at least this many members (default 2)")
    g.add_argument("--limit", type=int, default=20, help="at most this many groups (default 20)")
    g.add_argument("--json", action="store_true", help="JSON (the HTTP API's GET /groups body)")
    g.set_defaults(func=cmd_groups)

    d = sub.add_parser("duplicates", help="exact and behavioural duplicates, and scale families (of the index or one LoRA)")
    d.add_argument("lora_id", nargs="?", help="one LoRA's duplicates (default: every pair of the index)")
    d.add_argument("--index", required=True, help="index directory or URI")
    d.add_argument("--min-cosine", type=float, default=None, help="directions at least this parallel, (0, 1] (default 0.95)")
    d.add_argument("--min-strength-ratio", type=float, default=None,
                   help="smaller over larger strength at least this, (0, 1] (default 0.8)")
    d.add_argument("--limit", type=int, default=50, help="pairs to print (default 50)")
    d.add_argument("--json", action="store_true", help="JSON (for one LoRA: the HTTP API's body)")
    d.set_defaults(func=cmd_duplicates)
