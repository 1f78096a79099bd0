"""Workloads: the programs unified-memory research measures with, as device jobs over process memory.

UVMBench's PolyBench and Rodinia programs and its bfs and kmeans, the three access patterns of
NVIDIA's oversubscription sample, and the replay of a page-access trace file: each a
``Workload`` (hmmgpu/workloads/base.py) that maps its arrays in a process, lets the CPU write
the input, runs its kernels -- a CUDA lane and a NumPy twin each -- through any driver's job API,
and checks the result against plain NumPy.  ``WORKLOADS`` maps a name to its class;
``get(name)`` looks one up and ``default_footprint(name)`` gives the bytes of its default
instance.  docs/workloads.md lists them with their sizes and parameters.
"""
from .apps import Bfs, Kmeans
from .base import Check, Region, Workload
from .patterns import BlockStreaming, RandomWarp, Streaming
from .polybench import Atax, Bicg, Conv2d, Fdtd2d, Gemm, Gesummv, Mvt
from .replay import Trace, TraceFormatError, TraceReplay, load_trace, save_trace
from .rodinia import Backprop, Hotspot, Pathfinder, Srad

WORKLOADS = {cls.name: cls for cls in (
    Gemm, Conv2d, Atax, Mvt, Bicg, Gesummv, Fdtd2d,
    Hotspot, Pathfinder, Srad, Backprop,
    Bfs, Kmeans,
    Streaming, BlockStreaming, RandomWarp,
    TraceReplay)}


def get(name):
    """The workload class called ``name``; ValueError listing the names when there is none."""
    try:
        return WORKLOADS[name.lower()]
    except KeyError:
        raise ValueError(f"no workload {name!r}; there are {', '.join(WORKLOADS)}") from None


def default_footprint(name):
    """Bytes mapped by the default instance of workload ``name`` (None for a trace replay: its
    size is its trace's)."""
    cls = get(name)
    return None if cls is TraceReplay else cls().footprint


__all__ = ["WORKLOADS", "get", "default_footprint", "Workload", "Check", "Region", "Trace",
           "TraceFormatError", "load_trace", "save_trace"] + [c.__name__ for c in WORKLOADS.values()]
