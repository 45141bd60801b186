"""``python -m sparsediff.search`` (and ``accelerate launch -m sparsediff.search``): ``sparsediff search``."""

from ..loading import exit_process
from .cli import main

exit_process(main())
