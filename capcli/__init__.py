"""capcli: Show, Attend and Tell image captioning from the command line.

``from capcli import Captioner`` is the Python face; the heavy modules (torch) load on first use.
"""

__all__ = ["Captioner", "CaptionResult", "CapcliError"]

from capcli.errors import CapcliError
from capcli.version import __version__ as __version__


def __getattr__(name):
    if name in ("Captioner", "CaptionResult"):
        from capcli.infer import captioner as api

        return getattr(api, name)
    raise AttributeError(f"module 'capcli' has no attribute {name!r}")
