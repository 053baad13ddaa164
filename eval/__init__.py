"""The harness layer (installed as ``vlprune.eval``): examples, evaluation, demo and benchmarks."""
