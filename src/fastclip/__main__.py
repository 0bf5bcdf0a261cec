"""``python -m fastclip …``: the same as the ``fastclip`` command."""
import sys

from .cli import main

sys.exit(main())
