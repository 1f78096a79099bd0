"""What NVRTC compiles for the CuPy backend: the translation units and the options.

No CuPy here, so tests/test_device_nvrtc.py (and anyone with NVRTC but no GPU) can compile
exactly what hmmgpu/kernels/backend.py loads.  A unit is a .cu file of this directory (or a user
job's source) with hmmgpu's own headers pasted in between ``#line`` markers: compiler errors
name the real file and line, and the text alone determines the binary, so a cache keyed by it
can never serve a kernel built from an older hmm.cuh.
"""
import os
import re

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
# IEEE single precision, bit for bit what the NumPy twins compute: subnormals kept (-ftz=false;
# CuPy's RawModule would append -ftz=true, see backend.py) and every multiply and add rounded
# on its own (-fmad=false: no contraction into a fused multiply-add)
NVRTC_OPTIONS = ("--std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false",
                 "--generate-line-info")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$')


def kernel_source(filename, source=None):
    """The translation unit NVRTC compiles for hmmgpu/kernels/<filename> (or for a user job's
    ``source`` under that name): every ``#include "x"`` of a file in hmmgpu/kernels pasted in
    once, between ``#line`` markers.  The text alone therefore determines the binary."""
    if source is None:
        with open(os.path.join(KERNEL_DIR, filename)) as f:
            source = f.read()
    else:
        source = f'#include "hmm.cuh"\n#line 1 "{filename}"\n' + source
    return _expand(source, filename, set())


def _expand(text, name, seen):
    out = [f'#line 1 "{name}"']
    for i, line in enumerate(text.split("\n"), 1):
        m = _INCLUDE.match(line)
        if m and os.path.isfile(os.path.join(KERNEL_DIR, m.group(1))):
            hdr = m.group(1)
            if hdr not in seen:
                seen.add(hdr)
                with open(os.path.join(KERNEL_DIR, hdr)) as f:
                    out.append(_expand(f.read(), hdr, seen))
            out.append(f'#line {i + 1} "{name}"')
        elif line.strip() != "#pragma once":        # the seen set does its job once pasted
            out.append(line)
    return "\n".join(out)
