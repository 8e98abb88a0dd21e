"""`carlos-ray` command line: the user-facing output lives here, the logic in the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage; exits with status 2."""


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    sep = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])


# ---- zoo -----------------------------------------------------------------------------------------
def cmd_zoo(args: argparse.Namespace) -> int:
    from carlos_ray.zoo import make_zoo

    if args.n < 8:
        raise UsageError(f"a zoo needs n >= 8 to hold every planted behavior, got n={args.n}")
    members = make_zoo(args.dir, n=args.n, seed=args.seed)
    print(_table(members, ["name", "format", "role", "file"]))
    print(f"\nwrote {len(members)} LoRAs to {args.dir}")
    return EXIT_OK


# ---- inspect -------------------------------------------------------------------------------------
def inspect_paths(paths: list[str], targets: dict | None) -> list[dict]:
    """One result dict per file found under `paths` (files or directories, recursive)."""
    from carlos_ray.lora import LoraRejected, check_compatible, discover_loras, inspect_lora

    results: list[dict] = []

    def one(path: Path) -> None:
        try:
            info = inspect_lora(path)
            if targets is not None:
                check_compatible(info, targets)
        except LoraRejected as e:
            results.append({"path": str(path), "ok": False, "reason": f"{e.code}: {e.reason}", "code": e.code,
                            "format": None, "rank": None, "sha256": None})
            return
        results.append({"path": str(path), "ok": True, "reason": None, "code": None, "format": info.format,
                        "rank": info.rank, "alpha": info.alpha, "sha256": info.sha256, "size_bytes": info.size_bytes,
                        "tensors": info.tensor_count, "targets": {k: len(v) for k, v in info.targets.items()}})

    for p in paths:
        path = Path(p)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"no such file or directory: {p}")
        if path.is_dir():
            for item in discover_loras(path):
                if isinstance(item, LoraRejected):
                    results.append({"path": str(item.path), "ok": False, "reason": f"{item.code}: {item.reason}",
                                    "code": item.code, "format": None, "rank": None, "sha256": None})
                else:
                    one(item)
        else:
            one(path)
    return results


def cmd_inspect(args: argparse.Namespace) -> int:
    targets = None
    if not args.no_compat:
        from carlos_ray.config import Config
        from carlos_ray.models.generator import generator_lora_targets

        cfg = Config.from_file(args.config)
        targets = generator_lora_targets(cfg.generator)
    results = inspect_paths(args.paths, targets)
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        rows = [{**r, "ok": "yes" if r["ok"] else "NO", "sha256": (r["sha256"] or "")[:12], "reason": r["reason"] or ""}
                for r in results]
        print(_table(rows, ["path", "ok", "format", "rank", "sha256", "reason"]))
        bad = sum(not r["ok"] for r in results)
        print(f"\n{len(results)} files, {len(results) - bad} usable, {bad} rejected")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_REJECTED


# ---- index -------------------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> int:
    from carlos_ray.config import Config
    from carlos_ray.indexing import run_index

    cfg = Config.from_file(args.config)
    for src in args.loras:
        if not Path(src).exists():
            raise UsageError(f"LoRA source not found: {src}")
    from carlos_ray.uncertainty import format_estimate

    indexed: list[dict] = []
    s = run_index(cfg, args.loras, args.index, address=args.address, max_loras=args.max_loras,
                  retry_rejected=args.retry_rejected, on_lora=indexed.append)
    if indexed:
        print("\nindexed (± is a 95% interval):")
        print(_table([{"name": r["name"][:40], "strength": format_estimate(r["strength"], r["strength_se"]),
                       "consistency": format_estimate(r["consistency"], r["consistency_se"]), "samples": r["n"]}
                      for r in indexed], ["name", "strength", "consistency", "samples"]))
    if s.rejects:
        print("\nrejected:")
        print(_table([{"file": Path(r["path"] or "?").name, "code": r["code"], "reason": r["reason"][:120]}
                      for r in s.rejects], ["file", "code", "reason"]))
    print(f"\nindexed {s.indexed}, skipped {s.skipped} (already indexed), rejected {s.rejected}, "
          f"duplicates {s.duplicates}, images generated {s.images_generated}, wall time {s.wall_seconds:.1f} s")
    print(f"index: {args.index}")
    return EXIT_OK


# ---- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from carlos_ray.demo import run_demo

    return run_demo(Path(args.workdir), config=args.config)


# ---- parser --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors; keep that, with our prefix
        self.print_usage(sys.stderr)
        print(f"carlos-ray: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="carlos-ray", description="Characterize LoRAs by behavior and retrieve them from text, on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    z = sub.add_parser("zoo", help="write the synthetic LoRA zoo for the tiny generator")
    z.add_argument("dir")
    z.add_argument("--n", type=int, default=12, help="number of LoRAs (>= 8)")
    z.add_argument("--seed", type=int, default=0)
    z.set_defaults(func=cmd_zoo)

    i = sub.add_parser("inspect", help="inspect LoRA files (header only) and check them against the generator")
    i.add_argument("paths", nargs="+", help="files or directories (recursive)")
    i.add_argument("--json", action="store_true", help="one JSON object per file")
    i.add_argument("--config", default="conf/tiny.yaml", help="config whose generator the LoRAs must fit")
    i.add_argument("--no-compat", action="store_true", help="skip the compatibility check against the generator")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("index", help="index LoRAs (directories, files or manifests) into an index directory, on Ray")
    x.add_argument("--config", default="conf/tiny.yaml")
    x.add_argument("--loras", nargs="+", required=True, help="directories, .safetensors files, or CSV/JSONL/Parquet manifests")
    x.add_argument("--index", required=True, help="index directory or URI")
    x.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    x.add_argument("--max-loras", type=int, default=None, help="index at most this many new LoRAs, then stop")
    x.add_argument("--retry-rejected", action="store_true",
                   help="run again the LoRAs an earlier run rejected (bad samples, failed load, worker crashes)")
    x.set_defaults(func=cmd_index)

    d = sub.add_parser("demo", help="the whole mission on the embedded tiny default, no network")
    d.add_argument("--workdir", default="demo_out", help="where the zoo, index and report are written")
    d.add_argument("--config", default="conf/tiny.yaml")
    d.set_defaults(func=cmd_demo)

    from carlos_ray import cli_retrieval  # noqa: F401  (registers query, similar, serve)
    from carlos_ray import cli_report  # noqa: F401  (registers import-reference, report)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    _quiet_libraries()
    from carlos_ray.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as e:
        print(f"carlos-ray: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
