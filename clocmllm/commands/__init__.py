"""CLI commands: one module each, with `add_arguments(parser)` and `run(args) -> int`.

Keep module tops light (argparse, stdlib): heavy imports go inside `run`.
"""
