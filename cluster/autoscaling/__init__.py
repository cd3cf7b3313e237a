"""Autoscaling each pool on its own bottleneck (compute, memory, network), or
on queue length alone (requests).

``decision`` is the pure policy; ``serve_policy`` adapts it to Ray Serve's
custom autoscaling; ``signals`` names the metrics replicas report;
``ledger`` and ``publish`` make decisions visible to operators and the router.
"""
