"""``python -m hmmgpu.cli``: the hmmgpu command."""
import sys

from . import main

sys.exit(main())
