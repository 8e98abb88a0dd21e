"""`carlos-ray query | similar | serve`: retrieval from the command line (in-process) and the HTTP service."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from carlos_ray.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, table


CLI_MAX_K = 10_000
HIT_COLUMNS = ["rank", "lora_id", "score", "strength", "consistency", "name"]


def _load_ranker(index: str):
    """(ranker, manifest, FixedIndex) of one snapshot of the index (its tags and exact copies included)."""
    from carlos_ray.serving.watcher import load_fixed_index
    from carlos_ray.store import IndexError_

    try:
        fixed = load_fixed_index(index)
    except (IndexError_, ValueError) as e:
        raise UsageError(str(e)) from None
    return fixed.state.ranker, fixed.state.manifest, fixed


def _print_hits(hits: list[dict], header: str, ranker=None) -> None:
    """The hits as a table; with the ranker, strength and consistency carry their 95% intervals ("4.1 ± 0.2")."""
    from carlos_ray.uncertainty import format_estimate

    def se(lid: str, key: str) -> float | None:
        return None if ranker is None else ranker.get(lid).get(key)

    rows = [{**h, "score": f"{h['score']:.4f}",
             "strength": format_estimate(h["strength"], se(h["lora_id"], "strength_se")),
             "consistency": format_estimate(h["consistency"], se(h["lora_id"], "consistency_se")),
             "name": (h["name"] or "")[:40]} for h in hits]
    print(header)
    print(table(rows, HIT_COLUMNS) if rows else "(no LoRA passes the filters)")


def _checked(args: argparse.Namespace) -> tuple[int, float | None, float | None]:
    from carlos_ray.serving import ServiceError, check_k, check_thresholds

    try:
        k = check_k(args.k, CLI_MAX_K)
        ms, mc = check_thresholds(getattr(args, "max_strength", None), getattr(args, "min_consistency", None))
    except ServiceError as e:
        raise UsageError(e.detail) from None
    return k, ms, mc


def cmd_query(args: argparse.Namespace) -> int:
    from carlos_ray.serving import (EncoderUnavailable, RankerService, SearchResponse, ServiceError, check_query,
                                    load_query_encoder, query_spec_from_manifest, search_body)

    k, ms, mc = _checked(args)
    ranker, manifest, fixed = _load_ranker(args.index)
    try:
        text = check_query(args.text, query_spec_from_manifest(manifest).max_query_chars, where="the query")
    except ServiceError as e:
        raise UsageError(e.detail) from None
    try:
        encoder = load_query_encoder(manifest, device=args.device, allow_download=args.allow_download)
    except EncoderUnavailable as e:
        print(f"carlos-ray: error: cannot encode text queries for this index: {e}", file=sys.stderr)
        return EXIT_REJECTED
    service = RankerService(fixed)  # the same result shaping as the HTTP service
    try:
        out = service.search(encoder.encode([text]), k, ms, mc, tag=args.tag)
    except ServiceError as e:
        raise UsageError(e.detail) from None
    result = SearchResponse(**search_body(out, [text]))
    if args.json:
        print(result.model_dump_json())
    else:
        _print_hits([h.model_dump() for h in result.hits], f"query {text!r}: top {k} of {len(ranker)} LoRAs "
                    f"(max_strength {result.max_strength}, min_consistency {result.min_consistency}; ± is a 95% interval)",
                    ranker)
    return EXIT_OK


def cmd_similar(args: argparse.Namespace) -> int:
    from carlos_ray.serving import RankerService, ServiceError, SimilarResponse

    k, ms, mc = _checked(args)
    ranker, _, fixed = _load_ranker(args.index)
    service = RankerService(fixed)
    try:
        result = SimilarResponse(**service.similar(args.lora_id, k, ms, mc))
    except ServiceError as e:
        raise UsageError(e.detail) from None
    if args.json:
        print(result.model_dump_json())
    else:
        _print_hits([h.model_dump() for h in result.hits], f"LoRAs most similar to {args.lora_id!r} (± is a 95% interval):",
                    ranker)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Start Ray (or join --address), run the app, block until Ctrl-C, then remove what was started."""
    from pydantic import ValidationError

    from carlos_ray.config import format_validation_error
    from carlos_ray.serving import ServeArgs
    from carlos_ray.store import Index, IndexError_

    try:
        sargs = ServeArgs(index=args.index, host=args.host, port=args.port, max_k=args.max_k, poll_seconds=args.poll_seconds,
                          admin_token_env=args.admin_token_env, device=args.device, allow_download=args.allow_download)
    except ValidationError as e:
        raise UsageError(format_validation_error(e)) from None
    try:
        Index(sargs.index).read_manifest()
    except IndexError_ as e:
        raise UsageError(str(e)) from None
    import ray
    from ray import serve

    from carlos_ray.serving.app import build_app

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    started_serve = not _serve_running()
    stop = {"flag": False}

    def on_signal(signum, frame):  # SIGTERM behaves like Ctrl-C
        stop["flag"] = True

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        serve.start(http_options={"host": sargs.host, "port": sargs.port})
        serve.run(build_app(sargs), name=args.name, route_prefix="/", blocking=False)
        # Ctrl-C sets the flag the loop below polls, installed once Serve is up: a handler a library installs
        # during start-up cannot then swallow it (in the full suite the command never reached Serve's shutdown)
        signal.signal(signal.SIGINT, on_signal)
        base = f"http://{sargs.host}:{sargs.port}"
        print(f"carlos-ray: serving {sargs.index} at {base}\n  search page: {base}/   index: {base}/overview   "
              f"API docs: {base}/docs\n  Ctrl-C to stop", flush=True)
        while not stop["flag"]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        print("carlos-ray: stopping", flush=True)
        try:
            if started_serve:
                serve.shutdown()
            else:
                serve.delete(args.name)
        finally:
            if started_ray:
                ray.shutdown()
    return EXIT_OK


def _serve_running() -> bool:
    """Whether a Serve instance already runs on the connected cluster (then we only add and remove our app)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def add_commands(sub: argparse._SubParsersAction) -> None:
    from carlos_ray.serving.args import DEFAULT_MAX_K

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--index", required=True, help="index directory or URI")
        p.add_argument("-k", type=int, default=10, help=f"number of results, 1..{CLI_MAX_K} (default 10)")
        p.add_argument("--max-strength", type=float, default=None, help="keep LoRAs with strength <= X (default: the index's)")
        p.add_argument("--min-consistency", type=float, default=None,
                       help="keep LoRAs with consistency >= Y, 0..1 (default: the index's)")
        p.add_argument("--json", action="store_true", help="one JSON object (the HTTP API's response body)")

    q = sub.add_parser("query", help="top-k LoRAs for a text query (in-process, no Serve)")
    q.add_argument("text", help="the text query, e.g. 'watercolor'")
    common(q)
    q.add_argument("--device", default=None, help="torch device of the query encoder (default: the index's)")
    q.add_argument("--allow-download", action="store_true", help="let the encoder download missing pretrained weights")
    q.add_argument("--tag", default=None, help="only LoRAs carrying this behavioural tag (see `carlos-ray tags`)")
    q.set_defaults(func=cmd_query)

    s = sub.add_parser("similar", help="LoRAs whose behavior is closest to a given LoRA's (in-process)")
    s.add_argument("lora_id")
    common(s)
    s.set_defaults(func=cmd_similar)

    v = sub.add_parser("serve", help="serve the index over HTTP with Ray Serve; blocks until Ctrl-C")
    v.add_argument("--index", required=True, help="index directory or URI")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    v.add_argument("--name", default="carlos-ray", help="Serve application name")
    v.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help=f"largest k a request may ask for (default {DEFAULT_MAX_K})")
    v.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for a new index version")
    v.add_argument("--admin-token-env", default="CARLOS_RAY_ADMIN_TOKEN",
                   help="environment variable holding the bearer token of POST /admin/reload")
    v.add_argument("--device", default=None, help="torch device of the query encoder (default: the index's)")
    v.add_argument("--allow-download", action="store_true", help="let the encoder download missing pretrained weights")
    v.set_defaults(func=cmd_serve)

