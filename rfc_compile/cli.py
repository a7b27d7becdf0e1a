"""`rfc-compile` command: demo, export, calibrate.

Each subcommand lives with the code it drives (demo.py, export/cli.py, calibrate.py) and
exposes ``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("rfc_compile.demo", "generate digits with full compute and with RFC, print speed and quality"),
    "export": ("rfc_compile.export.cli", "export a cached model to ONNX (and a TensorRT engine when available)"),
    "calibrate": ("rfc_compile.calibrate", "find the RCS threshold that gives a target NFC"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rfc-compile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional part (e.g. export without onnx) is missing
            sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command not in modules:
        parser.error(f"'{args.command}' is unavailable here; see `rfc-compile --help`")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
