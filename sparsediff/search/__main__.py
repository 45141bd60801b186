"""``python -m sparsediff.search`` (and ``accelerate launch -m sparsediff.search``): ``sparsediff search``."""

import sys

from .cli import main

sys.exit(main())
