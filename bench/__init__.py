"""hmmgpu's benchmarks: the framework behind ``hmmgpu bench`` (framework.py) and its suites
(suites/, one module per suite).  The repository keeps this folder at its top level; it ships
inside the package as ``hmmgpu.bench`` (hmmgpu/bench links here), so a source checkout, an
editable install and a wheel all run the same code.  ``device_bench.py`` is a thin entry that
runs the ``device`` suite and writes the JSON a GPU check script reads."""
