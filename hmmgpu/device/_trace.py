"""The device layer's hooks into hmmgpu.trace (Chrome-trace events), free while tracing is off.

hmmgpu.trace may be absent (it is an optional layer): then every hook is a no-op.
"""
import contextlib

try:
    from .. import trace as _t
except ImportError:          # the observability module is not part of this build
    _t = None

_NULL = contextlib.nullcontext()


def span(name, cat, track, **args):
    """``with span(...)``: one complete event on ``track`` while tracing is on."""
    if _t is None or not _t.enabled:
        return _NULL
    return _t.span(name, cat, track=track, **args)


def counter(name, track, **values):
    """A counter sample on ``track`` while tracing is on (Perfetto draws it as a graph)."""
    if _t is not None and _t.enabled:
        _t.counter(name, track=track, **values)
