"""The names a model config takes, importable without torch: the CLI checks options before it loads anything."""

from capcli.errors import CapcliError

ENCODERS = ("lite0", "resnet50", "resnet101", "resnet152")  # plus "timm:<name>"
ATTENTIONS = ("additive", "general", "dot", "none")
RNNS = ("lstm", "gru")


def encoder_name_problem(name: str) -> str | None:
    """None for a name capcli can build, else why not (timm names are checked when timm builds them)."""
    if name in ENCODERS or (name.startswith("timm:") and len(name) > 5):
        return None
    return f"unknown encoder {name!r} (choose {', '.join(ENCODERS)} or timm:NAME)"


def check_names(encoder: str, attention: str, rnn: str) -> None:
    if problem := encoder_name_problem(encoder):
        raise CapcliError(problem)
    if attention not in ATTENTIONS:
        raise CapcliError(f"unknown attention {attention!r} (choose {', '.join(ATTENTIONS)})")
    if rnn not in RNNS:
        raise CapcliError(f"unknown rnn {rnn!r} (choose {', '.join(RNNS)})")
