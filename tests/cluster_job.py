"""Index on a three-node local cluster (`ray.cluster_utils.Cluster`) and remove a worker node mid-job.

Run by tests/test_faults.py in its own process (a driver connects to one cluster only, and the suite's
shared Ray instance is already up):

    python -m tests.cluster_job --loras DIR --index DIR --result FILE.json

Every node gets whole CPUs (Ray requires it) and every actor asks for one CPU, so each node holds one
actor: the head, and two workers. After the second finished LoRA a spare worker joins and one worker
is removed ungracefully (its raylet and actors are killed), taking an actor with it. The result file
records when the node left and the index summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> dict:
    """Own agent and metrics ports per node: the suite's Ray instance holds the defaults."""
    return {"dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port(),
            "runtime_env_agent_port": _free_port()}


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from carlos_ray.config import Config
    from carlos_ray.indexing import run_index

    ap = argparse.ArgumentParser()
    ap.add_argument("--loras", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--remove-after", type=int, default=2, help="remove a worker node after this many finished LoRAs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **_node_ports()})
    workers = [cluster.add_node(num_cpus=1, **_node_ports()) for _ in range(2)]
    result: dict = {"nodes_before": 3}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = Config.from_file("conf/tiny.yaml")
        for stage in (cfg.resources.generate, cfg.resources.embed):
            stage.num_cpus = 1.0  # one actor per node
        finished = []

        def on_lora(info: dict) -> None:
            finished.append(info["lora_id"])
            if len(finished) == args.remove_after:
                cluster.add_node(num_cpus=1, **_node_ports())  # room for the actor Ray restarts
                cluster.remove_node(workers[1], allow_graceful=False)
                result["removed_after_loras"] = len(finished)
                result["removed_at"] = time.time()
                print("removed a worker node", flush=True)

        summary = run_index(cfg, [args.loras], args.index, on_lora=on_lora)
        result.update(summary=summary.as_dict(), alive_nodes=sum(n["Alive"] for n in ray.nodes()))
    finally:
        with open(args.result, "w") as f:
            json.dump(result, f)
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
