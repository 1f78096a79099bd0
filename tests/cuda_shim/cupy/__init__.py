"""A CPU stand-in for the part of CuPy that hmmgpu uses (tests/test_device_cuda_cpu.py).

Arrays live in the emulated device's memory (cupy/_emu.py: a separate address space the host
cannot touch), every operation on them is queued on the current stream and runs when the host
waits, and kernels are the real .cu sources built with g++.  Only what hmmgpu and its bench
suites call is here; anything else raises AttributeError, so a new CuPy call in hmmgpu shows up
as a shim failure rather than passing by accident.  It checks what the code computes and in
what order it waits -- never how fast anything is.
"""
import ctypes
import operator
import weakref

import numpy as np

from . import _emu
from ._emu import DEVICE

__version__ = "14.2.0+cpu-shim"
uint8, uint32, uint64, int32, int64, float32, float64 = (np.uint8, np.uint32, np.uint64, np.int32, np.int64,
                                                         np.float32, np.float64)
bool_ = np.bool_


def _stream():
    from .cuda import get_current_stream
    return get_current_stream()


def _submit(fn):
    return DEVICE.queue(_stream().ptr).submit(fn)


def _host_view(ptr, dtype, shape, strides):
    """A NumPy view of emulated memory (touch it only inside DEVICE.access())."""
    dtype = np.dtype(dtype)
    if any(s == 0 for s in shape):
        return np.zeros(shape, dtype)
    extent = dtype.itemsize + sum((n - 1) * st for n, st in zip(shape, strides))
    buf = (ctypes.c_char * max(extent, 1)).from_address(ptr)
    return np.ndarray(shape, dtype, buffer=buf, strides=strides)


class _Memory:
    """One device allocation; given back (after the queues drain) when the last array goes."""

    def __init__(self, nbytes):
        self.size = int(nbytes)
        self.ptr = DEVICE.malloc(self.size)
        weakref.finalize(self, DEVICE.free_later,
                         lambda p=self.ptr, n=self.size: DEVICE.release_device(p, n))


class MemoryPointer:
    def __init__(self, mem, offset):
        self.mem = mem
        self.offset = int(offset)
        self.ptr = mem.ptr + self.offset

    def __add__(self, n):
        return MemoryPointer(self.mem, self.offset + int(n))


def _c_strides(shape, itemsize):
    st, acc = [], itemsize
    for n in reversed(shape):
        st.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(st))


class ndarray:
    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._shape = tuple(int(n) for n in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        self._dtype = np.dtype(dtype)
        n = int(np.prod(self._shape, dtype=np.int64))
        if memptr is None:
            memptr = MemoryPointer(_Memory(n * self._dtype.itemsize), 0)
        self.data = memptr
        self._strides = (tuple(strides) if strides is not None
                         else _c_strides(self._shape, self._dtype.itemsize))

    # -- metadata ------------------------------------------------------------------------------
    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)
    strides = property(lambda self: self._strides)
    ndim = property(lambda self: len(self._shape))
    size = property(lambda self: int(np.prod(self._shape, dtype=np.int64)))
    itemsize = property(lambda self: self._dtype.itemsize)
    nbytes = property(lambda self: self.size * self._dtype.itemsize)

    def __len__(self):
        if not self._shape:
            raise TypeError("len() of unsized object")
        return self._shape[0]

    def __repr__(self):
        return f"<emulated cupy.ndarray {self._shape} {self._dtype} at 0x{self.data.ptr:x}>"

    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    def _h(self):
        return _host_view(self.data.ptr, self._dtype, self._shape, self._strides)

    def _is_contiguous(self):
        return self._strides == _c_strides(self._shape, self._dtype.itemsize)

    # -- transfers -----------------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        s = stream if stream is not None else _stream()
        DEVICE.queue(s.ptr).run()
        with DEVICE.access():
            res = np.array(self._h(), copy=True)
        if out is not None:
            out[...] = res
            return out
        return res

    def set(self, arr, stream=None):
        src = np.array(arr, dtype=self._dtype, copy=True)       # pageable: staged at call time
        dst = self

        def op():
            dst._h()[...] = src
        DEVICE.queue((stream or _stream()).ptr).submit(op)

    def item(self):
        return self.get().item()

    def __int__(self):
        return int(self.item())

    def __float__(self):
        return float(self.item())

    def __bool__(self):
        return bool(self.item())

    def __index__(self):
        return operator.index(self.item())

    # -- indexing ------------------------------------------------------------------------------
    def _view_of(self, key):
        """Basic indexing (ints, slices, None, Ellipsis) as a view, computed without touching
        memory: integer indices become length-1 slices, then those axes are dropped."""
        key = key if isinstance(key, tuple) else (key,)
        sliced, drop, axis = [], [], 0
        for k in key:
            if k is Ellipsis:
                n_rest = sum(1 for x in key if x is not None and x is not Ellipsis)
                take = self.ndim - n_rest
                sliced.extend([slice(None)] * take)
                axis += take
            elif k is None:
                sliced.append(None)
            elif isinstance(k, (int, np.integer)):
                i = int(k)
                if i < 0:
                    i += self._shape[axis]
                if not 0 <= i < self._shape[axis]:
                    raise IndexError(f"index {int(k)} is out of bounds for axis {axis} "
                                     f"with size {self._shape[axis]}")
                drop.append(len(sliced))
                sliced.append(slice(i, i + 1))
                axis += 1
            else:
                sliced.append(k)
                axis += 1
        v = self._h()[tuple(sliced)]
        shape = [n for i, n in enumerate(v.shape) if i not in drop]
        strides = [s for i, s in enumerate(v.strides) if i not in drop]
        ptr = v.__array_interface__["data"][0] if v.size else self.data.ptr
        return ndarray(tuple(shape), self._dtype, MemoryPointer(self.data.mem, ptr - self.data.mem.ptr),
                       strides=tuple(strides))

    @staticmethod
    def _is_basic(key):
        ks = key if isinstance(key, tuple) else (key,)
        return all(k is None or k is Ellipsis or isinstance(k, (slice, int, np.integer)) for k in ks)

    @staticmethod
    def _key_now(key):
        """A fancy key with its device arrays resolved (inside DEVICE.access())."""
        ks = key if isinstance(key, tuple) else (key,)
        out = tuple(k._h() if isinstance(k, ndarray) else k for k in ks)
        return out if isinstance(key, tuple) else out[0]

    @staticmethod
    def _snapshot_key(key):
        ks = key if isinstance(key, tuple) else (key,)
        out = tuple(np.array(k) if isinstance(k, (np.ndarray, list)) else k for k in ks)
        return out if isinstance(key, tuple) else out[0]

    def __getitem__(self, key):
        if self._is_basic(key):
            return self._view_of(key)
        key = self._snapshot_key(key)
        shape = np.empty(self._shape, dtype=np.uint8)[self._placeholder_key(key)].shape
        out = ndarray(shape, self._dtype)
        src = self

        def op():
            out._h()[...] = src._h()[src._key_now(key)]
        _submit(op)
        return out

    def _placeholder_key(self, key):
        """The key with device arrays replaced by zero arrays of their shape (for result shapes)."""
        ks = key if isinstance(key, tuple) else (key,)
        out = tuple(np.zeros(k.shape, k.dtype) if isinstance(k, ndarray) else k for k in ks)
        return out if isinstance(key, tuple) else out[0]

    def __setitem__(self, key, value):
        key = self._snapshot_key(key)
        if not isinstance(value, ndarray):
            value = np.array(value, dtype=self._dtype, copy=True)     # staged at call time
        dst = self

        def op():
            v = value._h() if isinstance(value, ndarray) else value
            dst._h()[dst._key_now(key)] = v
        _submit(op)

    def fill(self, value):
        dst, v = self, self._dtype.type(value)

        def op():
            dst._h()[...] = v
        _submit(op)

    # -- arithmetic the code uses --------------------------------------------------------------
    def _ufunc(self, fn, other, dtype=None):
        o = other
        if isinstance(o, np.ndarray):
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")
        shape = np.broadcast_shapes(self._shape, o.shape if isinstance(o, ndarray) else ())
        probe = fn(np.zeros(1, self._dtype), np.zeros(1, o.dtype) if isinstance(o, ndarray) else o)
        out = ndarray(shape, dtype or probe.dtype)
        a = self

        def op():
            out._h()[...] = fn(a._h(), o._h() if isinstance(o, ndarray) else o)
        _submit(op)
        return out

    def __eq__(self, o):
        return self._ufunc(np.equal, o)

    def __ne__(self, o):
        return self._ufunc(np.not_equal, o)

    def __lt__(self, o):
        return self._ufunc(np.less, o)

    def __le__(self, o):
        return self._ufunc(np.less_equal, o)

    def __gt__(self, o):
        return self._ufunc(np.greater, o)

    def __ge__(self, o):
        return self._ufunc(np.greater_equal, o)

    def __add__(self, o):
        return self._ufunc(np.add, o)

    def __sub__(self, o):
        return self._ufunc(np.subtract, o)

    def __mul__(self, o):
        return self._ufunc(np.multiply, o)

    def __and__(self, o):
        return self._ufunc(np.bitwise_and, o)

    def __or__(self, o):
        return self._ufunc(np.bitwise_or, o)

    def __rshift__(self, o):
        return self._ufunc(np.right_shift, o)

    def __lshift__(self, o):
        return self._ufunc(np.left_shift, o)

    __hash__ = object.__hash__

    def astype(self, dtype, copy=True):
        out = ndarray(self._shape, dtype)
        a = self

        def op():
            out._h()[...] = a._h().astype(out.dtype)
        _submit(op)
        return out

    def copy(self):
        return self.astype(self._dtype)

    def _reduce(self, fn, dtype=None):
        out = ndarray((), dtype or fn(np.zeros(1, self._dtype)).dtype)
        a = self

        def op():
            out._h()[...] = fn(a._h())
        _submit(op)
        return out

    def sum(self, axis=None, dtype=None):
        if axis is not None:
            raise NotImplementedError("the CUDA shim sums whole arrays only")
        return self._reduce(lambda x: np.sum(x, dtype=dtype), dtype)

    def any(self):
        return self._reduce(np.any)

    def all(self):
        return self._reduce(np.all)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if not self._is_contiguous():
            raise NotImplementedError("the CUDA shim reshapes contiguous arrays only")
        shape = np.empty(self._shape, np.uint8).reshape(shape).shape
        return ndarray(shape, self._dtype, self.data)

    def ravel(self):
        return self.reshape(-1)

    def view(self, dtype):
        if not self._is_contiguous():
            raise NotImplementedError("the CUDA shim views contiguous arrays only")
        shape = np.empty(self._shape, self._dtype).view(dtype).shape
        return ndarray(shape, dtype, self.data)


def empty(shape, dtype=float, order="C"):
    a = ndarray(shape, dtype)

    def op():                                    # not zeroed: a read before a write shows
        ctypes.memset(a.data.ptr, 0xCD, a.nbytes)
    if a.nbytes:
        _submit(op)
    return a


def full(shape, value, dtype=None):
    dtype = dtype or np.asarray(value).dtype
    a = ndarray(shape, dtype)
    a.fill(value)
    return a


def zeros(shape, dtype=float, order="C"):
    # device addresses are never reused, so a new allocation reads as zeros already (and a
    # large, mostly untouched arena costs no memory, as on a GPU whose pages are not yet touched)
    return ndarray(shape, dtype)


def ones(shape, dtype=float, order="C"):
    return full(shape, 1, dtype)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    src = np.array(a, dtype=dtype, copy=True)          # pageable memory: staged at call time
    out = ndarray(src.shape, src.dtype)
    out.set(src)
    return out


array = asarray


def flatnonzero(a):
    """The count decides the result's shape: the host waits for the stream (as CuPy does)."""
    DEVICE.queue(_stream().ptr).run()
    with DEVICE.access():
        idx = np.flatnonzero(a._h())
    return asarray(idx)


class _Pool:
    def free_all_blocks(self):
        DEVICE._reap()

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0


_pool = _Pool()


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pool


class RawKernel:
    """A kernel of a built module; ``RawKernel(code, name, options)`` compiles ``code`` the way
    CuPy does (RawModule below)."""

    def __init__(self, library, name, options=(), **kw):
        if isinstance(library, str):
            library = RawModule(code=library, options=options).library
        self.library = library
        self.name = name
        library.function(name)                           # AttributeError now if it does not exist
        self.attributes = {"num_regs": 0, "local_size_bytes": 0, "max_threads_per_block": 1024,
                           "shared_size_bytes": 0, "const_size_bytes": 0, "binary_version": 90,
                           "ptx_version": 90}

    def __call__(self, grid, block, args, shared_mem=0, enable_cooperative_groups=False):
        if len(args) > 20:
            raise ValueError("the CUDA shim passes at most 20 kernel arguments (launch.cpp's EMU_MAX_ARGS)")
        words = (ctypes.c_uint64 * 20)()
        keep = []
        for i, a in enumerate(args):
            if isinstance(a, ndarray):
                words[i] = a.data.ptr
                keep.append(a)
            elif isinstance(a, np.ndarray):
                raise TypeError("Unsupported type <class 'numpy.ndarray'>")
            elif isinstance(a, np.generic):
                if a.dtype.itemsize != 8:
                    raise TypeError(f"kernel argument {i} is {a.dtype}: hmmgpu's kernels take 64-bit "
                                    "parameters only, and the shim passes every argument as one")
                words[i] = int(np.asarray(a).view(np.uint64))
            elif isinstance(a, (bool, int)):
                words[i] = int(a) & 0xFFFFFFFFFFFFFFFF
            else:
                raise TypeError(f"Unsupported type {type(a)}")
        grid = grid if isinstance(grid, tuple) else (grid,)
        block = block if isinstance(block, tuple) else (block,)
        lib, name = self.library, self.name

        def op():
            keep                                   # the arrays live until the kernel ran
            lib.launch(name, int(grid[0]), int(block[0]), words)
        _submit(op)


class RawModule:
    """``RawModule(path=...)`` loads a built module; ``RawModule(code=..., options=...)``
    compiles the way CuPy does, appending ``-ftz=true`` after the caller's options."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", **kw):
        if path is not None:
            self.library = _emu.Library(path)
        else:
            so, log = _emu.build(code, tuple(options) + ("-ftz=true",))
            if so is None:
                raise RuntimeError("compile failed (g++):\n" + log)
            self.library = _emu.Library(so)

    def get_function(self, name):
        return RawKernel(self.library, name)

    def compile(self, log_stream=None):
        pass


def show_config():
    print(f"CuPy {__version__}: a CPU emulation for tests (tests/cuda_shim)")


def __getattr__(name):
    raise AttributeError(f"the CUDA shim does not emulate cupy.{name}: add it to tests/cuda_shim/cupy "
                         "if hmmgpu needs it")


from . import cuda  # noqa: E402
