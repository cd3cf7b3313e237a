"""Planning: a profile database, a step-time model and a cluster simulator.

- ``db``: SQLite profile database (hardware, model shapes, engine settings,
  step times, hand-off throughput, start-up times, quality), each row
  ``measured`` or ``derived`` (its tables' SQL: ``db_schema``);
  ``catalog.yaml`` holds datasheet figures,
  the efficiency model and prices.
- ``step_model``: a step's duration from its mix of work, fitted to
  measured rows or a roofline of shape x hardware; ``profiles`` picks the
  best available for a (model, hardware, settings).
- ``profiler`` / ``profile_run``: ``splitserve profile`` measures the
  local engine into the database.
- ``workload``: Mooncake and Azure trace readers, synthetic and diurnal
  arrivals.
- ``sim``: ``splitserve simulate``, a discrete-event simulator that runs
  the production RouterCore, autoscaling decision and engine Scheduler.

docs/planning.md is the user's guide.
"""
