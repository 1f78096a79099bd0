"""fallback: the NumPy backend's migration of scattered pages against a NumPy gather.

Runs on the NumPy backend whatever backend the rest of the run uses (the design target:
fallback migrate of 256 MiB of scattered pages >= 0.7 of a NumPy gather of the same frames).
"""
from . import migration

NAME = "fallback"
DESCRIPTION = "NumPy backend: migrate scattered pages vs a NumPy gather of the same frames"


def run(ctx):
    nbytes = (8 << 20) if ctx.quick else (256 << 20)
    label, ctx.label = ctx.label, "emulated (numpy fallback)"
    try:
        start = len(ctx.rows)
        migration.run(ctx, backend_name="numpy", nbytes_list=[nbytes], target=">= 0.7")
        # the target is stated for scattered pages; contiguous rows are shown for comparison
        for r in ctx.rows[start:]:
            if "contiguous" in r["figure"]:
                r["target"] = None
                r["meets_target"] = None
    finally:
        ctx.label = label
