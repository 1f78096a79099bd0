"""fallback: the NumPy backend's migration of scattered pages, whatever backend the run uses.

On a GPU run this adds the fallback's design target (migrate 256 MiB of scattered pages at
>= 0.7 of the fastest plain NumPy copy of the same pages) beside the GPU figures.  On the NumPy
backend the migration suite measures exactly this, so the suite is skipped rather than print the
same figures twice.
"""
from ..measure import Skip
from . import migration

NAME = "fallback"
DESCRIPTION = "NumPy backend: migrate scattered pages vs the fastest NumPy copy (GPU runs only)"


def run(ctx):
    if not ctx.gpu:
        raise Skip("on the numpy backend the migration suite's scattered rows are these figures")
    nbytes = migration.QUICK_BYTES if ctx.quick else (256 << 20)
    label, ctx.label = ctx.label, "emulated (numpy fallback)"
    try:
        migration.run(ctx, backend_name="numpy", nbytes_list=[nbytes], target=">= 0.7", layouts=("scattered",))
    finally:
        ctx.label = label
