"""The NumPy backend: the device primitives in vectorised NumPy, same semantics as the CUDA code.

    backend.py     NumpyBackend and its arenas
    dma.py         the copy engine
    pagetable.py   the page-table walker and command executor
    jobs.py        the fault ring, the MMU of the jobs, the lane context and the job twins
"""
