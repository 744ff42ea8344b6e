"""The measurements behind ``tools/benchmark_distill.py``: what each part times and how,
with the machine it ran on (:mod:`qdet.benchmark.machine`)."""
