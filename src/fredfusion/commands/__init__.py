"""The `fredfusion` commands, one module each.

Every command module has the same shape: ``add_parser(subparsers)`` registers the command and its
flags (built from the shared groups in ``flags``), and ``run(args) -> int`` does the work and returns
the exit status. Heavy imports happen inside ``run``, so ``fredfusion --help`` stays fast.
"""

NAMES: tuple[str, ...] = (
    "synth",
    "prepare",
    "train",
    "eval",
    "predict",
    "show",
    "export",
    "convert",
    "demo",
    "bench",
    "ablate",
)
"""The commands, in the order ``fredfusion --help`` lists them (module ``fredfusion.commands.<name>``)."""
