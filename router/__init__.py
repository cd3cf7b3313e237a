"""Request placement: which prefill and decode replicas serve a request.

Pure logic over plain data (no torch, no Ray): ``types`` (contracts and
errors), ``config`` (``RouterConfig`` and each model's ``ModelFacts``),
``reports`` (what replicas push, and the router's view of it),
``prefix_index`` (who caches which blocks), ``cost_model`` (TTFT and load
estimates), ``eligibility`` and ``selection`` (usable replicas and the
search for the best), ``policies`` (the registry), ``admission`` (in-flight
limits), ``core`` (``RouterCore``: replica state and decisions),
``exchange`` (what ingresses and routers say to each other), ``leases``
(admission slots held by ingresses), ``wait_queue`` (requests waiting for a
replica), ``estimator`` (expected output lengths) and ``service``
(``RouterService``, which the router actor wraps).
"""
