"""``python -m flexvlm``: LightningCLI's fit | validate | test | predict (``flexvlm.cli``), and flexvlm's
own commands, which LightningCLI does not know: its ``--help`` is followed by a paragraph on them."""

from __future__ import annotations

import importlib
import sys

# command -> (the module whose main(args) runs it and returns the exit status, what it does)
COMMANDS = {
    "check-data": ("flexvlm.data.check", "read every sample of the configured data and list its problems "
                                         "(--config as for fit)"),
    "export": ("flexvlm.export", "write a trained run in its architecture's own format, which "
                                 "flexvlm.architectures.from_pretrained loads (--ckpt, --out)"),
}


def commands_help() -> str:
    lines = [f"  {name:12s}{what}" for name, (_, what) in COMMANDS.items()]
    return "flexvlm's other commands (python -m flexvlm <command> --help):\n" + "\n".join(lines)


def main() -> int | None:
    """The command of ``sys.argv`` (LightningCLI reads it itself); the exit status."""
    args = sys.argv[1:]
    if args[:1] and args[0] in COMMANDS:
        return importlib.import_module(COMMANDS[args[0]][0]).main(args[1:])
    from flexvlm.cli import main as cli_main

    if args not in (["--help"], ["-h"]):
        cli_main()
        return None
    try:
        cli_main()  # prints LightningCLI's help and exits
    except SystemExit as done:
        if not done.code:
            print("\n" + commands_help())
        raise
    return None


if __name__ == "__main__":
    sys.exit(main())
