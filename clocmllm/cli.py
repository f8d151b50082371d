"""One CLI, `clocmllm <command>`.

Each command lives in `clocmllm/commands/<module>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. This file imports none of them up front, so `clocmllm --help` stays instant
and neither JAX nor torch is loaded by a command that does not use it. A command module itself
must import its heavy side only inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under clocmllm.commands, one-line help, issue that delivers it)
COMMANDS: dict[str, tuple[str, str, int]] = {
    "world": ("world", "render the synthetic region-text world", 2),
    "data": ("data", "inspect and validate datasets (data check PATH)", 2),
    "pretrain": ("pretrain", "CLOC / CLIP pretraining in JAX", 3),
    "eval": ("eval", "evaluate an encoder (eval encoder) or an MLLM (eval mllm)", 3),
    "export": ("export", "export a JAX checkpoint to a Hugging Face CLIP folder", 4),
    "import-clip": ("import_clip", "import a local Hugging Face CLIP folder into JAX", 4),
    "proposer": ("proposer", "train the box proposer of proposal grounding on a tower", 6),
    "finetune": ("finetune", "fine-tune the LLaVA-style MLLM", 5),
    "chat": ("chat", "chat with an MLLM about an image on the terminal", 5),
    "serve": ("serve", "serve a web chat page on 127.0.0.1", 6),
    "label": ("label", "VESL: label images with region-text boxes", 7),
    "demo": ("demo", "run the whole pipeline end to end", 6),
}


def command_module(name: str):
    """The module of a command, or None when that command is not built yet."""
    module_name = f"clocmllm.commands.{COMMANDS[name][0]}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="clocmllm",
        description="CLOC: region-aware vision encoders (JAX) and grounding MLLMs (PyTorch).",
        epilog="Run `clocmllm <command> --help` for a command's options.",
    )
    top.add_argument("--version", action="version", version=_version())
    sub = top.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text, _issue) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)

    # Parse only the command name first; the chosen command builds its own parser.
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    module = command_module(name)
    if module is None:
        print(
            f"clocmllm {name}: not built yet (issue #{COMMANDS[name][2]} delivers it).",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"clocmllm {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


def _version() -> str:
    from clocmllm import __version__

    return f"clocmllm {__version__}"


if __name__ == "__main__":
    sys.exit(main())
