"""capcli: Show, Attend and Tell image captioning from the command line.

``from capcli import Captioner`` is the Python face; the heavy modules (torch) load on first use.
"""

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionResult", "CapcliError"]

from capcli.errors import CapcliError


def __getattr__(name):
    if name in ("Captioner", "CaptionResult"):
        from capcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'capcli' has no attribute {name!r}")
