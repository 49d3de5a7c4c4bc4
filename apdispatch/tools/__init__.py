"""Tools around a running system: load generator, demo, benchmarks, sim-vs-live
fidelity, compose file and emulated topology."""
