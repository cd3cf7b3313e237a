"""Run on the head of a ``ray up`` cluster (``ray exec FILE "python -m
tests.integration.ray_up_probe"``): prints one ``PLACEMENT {json}`` line
with each alive node's address and custom resources, and the node address
of each alive Serve replica actor, read from Ray's state API."""

import json

import ray
from ray.util.state import list_actors


def main() -> None:
    ray.init(address="auto", log_to_driver=False)
    nodes = {n["NodeID"]: {"ip": n["NodeManagerAddress"], "resources": n["Resources"]}
             for n in ray.nodes() if n["Alive"]}
    replicas = [{"class_name": a.class_name, "node_ip": nodes[a.node_id]["ip"]}
                for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.startswith("ServeReplica:")]
    print("PLACEMENT " + json.dumps({"nodes": list(nodes.values()), "replicas": replicas}))


if __name__ == "__main__":
    main()
