"""A simulated two-node Ray cluster on this machine (ray.cluster_utils.Cluster), for the tests.

Run as a script: prints ``{"address": ...}``, then reads commands on stdin (``remove``: end the
second node's processes, as when a machine is lost) and shuts the cluster down at EOF. Its own
process keeps Ray out of the test process, and its nodes on the loopback address."""

from __future__ import annotations

import json
import os
import sys

# Ray's one-machine setting: every node on 127.0.0.1, nothing on the machine's network (read at import).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster  # noqa: E402


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "remove":
                cluster.remove_node(second, allow_graceful=False)
                print("removed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
