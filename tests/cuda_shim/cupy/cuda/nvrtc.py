"""cupy.cuda.nvrtc of the CUDA shim: "compiles" with g++ (cupy/_emu.py), honouring -ftz/-fmad."""
import itertools
import os

from .. import _emu


class NVRTCError(RuntimeError):
    pass


_progs = {}
_ids = itertools.count(1)


def getVersion():
    if os.environ.get("HMMGPU_SHIM_NO_NVRTC"):          # a driver-only machine: no toolkit
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open "
                           "shared object file: No such file or directory")
    return (12, 9)


def getSupportedArchs():
    return (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 120)


def createProgram(src, name, headers, include_names):
    getVersion()
    p = next(_ids)
    _progs[p] = {"src": src, "name": name, "log": "", "so": None}
    return p


def compileProgram(prog, options):
    p = _progs[prog]
    so, log = _emu.build(p["src"], tuple(options))
    p["log"] = log
    if so is None:
        raise NVRTCError("NVRTC_ERROR_COMPILATION (6)")
    p["so"] = so


def getProgramLog(prog):
    return _progs[prog]["log"]


def getCUBIN(prog):
    with open(_progs[prog]["so"], "rb") as f:
        return f.read()


getPTX = getCUBIN


def destroyProgram(prog):
    _progs.pop(prog, None)
