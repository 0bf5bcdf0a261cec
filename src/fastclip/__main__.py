"""``python -m fastclip …``: the same as the ``fastclip`` command."""
from .cli import entry

entry()
