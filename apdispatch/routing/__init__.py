"""Where a request goes: the registry of workers and targets, the latency estimator,
admission and the router, the policy interface and the static policies."""
