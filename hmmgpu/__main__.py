"""``python -m hmmgpu``: the hmmgpu command."""
import sys

from .cli import main

sys.exit(main())
