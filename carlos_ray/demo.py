"""`carlos-ray demo`: the mission end to end on the embedded tiny default."""

from __future__ import annotations

import shutil
from pathlib import Path


def run_demo(workdir: Path, config: str = "conf/tiny.yaml") -> int:
    from carlos_ray.cli import _table, inspect_paths
    from carlos_ray.config import Config
    from carlos_ray.lora.hostile import write_hostile_corpus
    from carlos_ray.models.generator import generator_lora_targets
    from carlos_ray.zoo import make_zoo

    cfg = Config.from_file(config)
    zoo = workdir / "zoo"
    if zoo.exists():
        shutil.rmtree(zoo)
    print(f"[1/2] writing the synthetic zoo to {zoo}")
    members = make_zoo(zoo, n=12, seed=0)
    hostile = write_hostile_corpus(zoo / "hostile")
    print(f"      {len(members)} LoRAs with planted behavior, {len(hostile)} hostile files beside them")
    print("[2/2] inspecting every file (header only) against the tiny SDXL generator")
    results = inspect_paths([str(zoo)], generator_lora_targets(cfg.generator))
    ok = [r for r in results if r["ok"]]
    bad = [r for r in results if not r["ok"]]
    print(f"      {len(ok)} usable, {len(bad)} rejected:")
    print(_table([{"file": Path(r["path"]).name, "reason": r["reason"]} for r in bad], ["file", "reason"]))
    return 0
