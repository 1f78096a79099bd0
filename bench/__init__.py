"""hmmgpu's benchmarks: the framework and suites behind ``hmmgpu bench`` (bench/bench.py,
bench/suites/), and the layers' own micro-benchmarks (device_bench.py, hmm_bench.py, mm_bench.py)."""
