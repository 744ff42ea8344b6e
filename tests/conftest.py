import os

# Tests run the eager quantizer bodies (deterministic, no compile time); the compiled
# backend has its own test that switches to it explicitly.
os.environ.setdefault("QDET_QUANT_BACKEND", "eager")
os.environ.setdefault("OMP_NUM_THREADS", "2")
