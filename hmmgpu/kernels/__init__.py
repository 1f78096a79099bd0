"""The CuPy backend: device code in real .cu/.cuh files and the Python that launches it.

    hmm.cuh        the emulated MMU for jobs: page-table walk, fault records, hmm_lane with
                   hmm_load / hmm_store / hmm_atomic_add / hmm_probe, HMM_DEFINE_JOB for user jobs
    pagetable.cu   the page table's command processor and lookup
    jobs.cu        built-in jobs: memset, copy, axpy, reduce, gather, list chase, tree search
    dma.cu         the copy engine's page scatter/gather kernel
    source.py      the translation units NVRTC compiles (headers pasted in) and its options
    backend.py     CupyBackend, arenas (pinned mapped host memory, GPU memory), fences, info
    module.py      NVRTC compile and the module cache (each source compiled once, loaded once
                   per GPU), kernel launches, the staging uploader, the auto probe's test kernel
    dma.py / pagetable.py / jobs.py   the engines that launch those kernels

Nothing is imported from here at ``import hmmgpu`` time; CuPy is loaded only when the cupy
backend is chosen.
"""
