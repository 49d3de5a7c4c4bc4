"""The discrete-event simulator: the live AP's routing, driven by a model of a scenario.

Modules, in the order a run uses them:

- ``profile``: where the zoo's variant latencies come from (the shipped reference profile, or
  ``measured``: the manifest's);
- ``calibration``: those latencies to service times (``Calibration``, ``fit_calibration``);
- ``model``: the scenario's variants, devices and workers (``build_model``);
- ``arrivals``: the queries offered, the live load generator's plan (``plan_arrivals``);
- ``engine``: one run of one policy (``Simulation``); the device model is documented there;
- ``results``: every policy on the same arrivals, JSON and table (``run_policies``, ``to_json``);
- ``bound``: the upper bound on the success ratio reported beside them (``upper_bound``);
- ``plot``: timelines (``plot_report``);
- ``env``: window-level control for ASET-style agents (``DispatchEnv``);
- ``seeds``: one scenario over several seeds; ``evaluate``: the evaluation table;
- ``generate``: random scenarios; ``train``: pre-training learned policies;
- ``speed``: simulated queries per second; ``command``: ``apdispatch sim``.

Nothing is imported here, so that ``import apdispatch.sim.X`` loads only what X needs.
"""
