"""``ftlab``: the command.

    ftlab fit --config configs/lora.yaml
    ftlab fit --config configs/lora.yaml --model.init_args.method.init_args.rank 64
    ftlab validate|test|predict --config ... [--ckpt_path ...]
    ftlab export | data | sweep ...

Lightning's subcommands run through ``FtlabCLI`` (``ftlab.lightning_cli``); the others are plain
functions registered in ``EXTRA_COMMANDS``. This module imports nothing heavy, so ``ftlab --help``
answers without loading Lightning.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from typing import Any

LIGHTNING_COMMANDS = {
    "fit": "train a method on an objective and data",
    "validate": "run the validation loop (e.g. exact match before training)",
    "test": "run the test loop",
    "predict": "generate or predict; writes predictions.jsonl to the run directory",
}
#: Subcommands beside Lightning's: name -> ("module:function(argv)", one-line description).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("ftlab.export:main", "fold an adapter into its base and write a plain transformers model"),
    "data": ("ftlab.data.tools:main", "data tools: rouge-filter, flan, sharegpt, labelstudio"),
    "sweep": ("ftlab.sweep:main", "run a grid of configs (ablations, method comparisons) and tabulate"),
}


def _help() -> str:
    rows = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in EXTRA_COMMANDS.items()}}
    width = max(map(len, rows))
    lines = [f"  {name:<{width}}  {text}" for name, text in rows.items()]
    return "\n".join(
        [
            f"usage: ftlab {{{','.join(rows)}}} ...",
            "",
            "ftlab: fine-tuning as method x objective x data, from one YAML.",
            "",
            "commands:",
            *lines,
            "",
            "Each command has its own --help (e.g. `ftlab fit --help`); `ftlab fit --config "
            "configs/lora.yaml` "
            "runs the embedded default.",
        ]
    )


def main(args: list[str] | None = None) -> None:
    _log_to_stderr()
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return None
    if argv[0] in EXTRA_COMMANDS:
        module, _, func = EXTRA_COMMANDS[argv[0]][0].partition(":")
        command = getattr(importlib.import_module(module), func)
        return _friendly(lambda: command(argv[1:]))
    if len(argv) == 2 and argv[0] in LIGHTNING_COMMANDS and argv[1] in ("-h", "--help"):
        print(_subcommand_help(argv[0], args), end="")
        return None
    from ftlab.lightning_cli import run

    return _friendly(lambda: run(args))  # None: Lightning reads sys.argv itself


def _subcommand_help(command: str, args: list[str] | None) -> str:
    """``ftlab fit --help``, built once per installed version and kept in the user's cache folder:
    building it imports Lightning (~4-5 s on 2 cores), but the text only changes with the code."""
    import contextlib
    import hashlib
    import io
    import shutil
    from importlib.metadata import version
    from pathlib import Path

    package = Path(_PACKAGE)
    stamps = sorted(
        (str(p.relative_to(package)), p.stat().st_mtime_ns, p.stat().st_size) for p in package.rglob("*.py")
    )
    versions = [version(name) for name in ("lightning", "jsonargparse", "torch", "transformers")]
    key = hashlib.sha1(
        repr((command, stamps, versions, shutil.get_terminal_size().columns)).encode()
    ).hexdigest()[:16]
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "ftlab"
        / f"help-{command}-{key}.txt"
    )
    if cache.exists():
        return cache.read_text()
    from ftlab.lightning_cli import run

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        run(args)
    try:  # a cache that cannot be written costs only speed
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text.getvalue())
        tmp.replace(cache)
    except OSError:
        pass
    return text.getvalue()


def __getattr__(name: str) -> Any:
    # ``from ftlab.cli import FtlabCLI`` still works; importing it here eagerly would load Lightning
    # (~4 s) for every ``ftlab --help``.
    if name == "FtlabCLI":
        from ftlab.lightning_cli import FtlabCLI

        return FtlabCLI
    raise AttributeError(f"module 'ftlab.cli' has no attribute {name!r}")


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message (tests and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    """ftlab's own INFO messages (truncation counts, quantization sizes, progress lines) go to stderr."""
    log = logging.getLogger("ftlab")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ftlab: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Errors that ftlab's own checks raise for user mistakes (and OSErrors of files the user named).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, RuntimeError)


def _friendly(run) -> None:
    """Run ``run()``; a mistake that ftlab's own code detected ends in one line and exit code 2
    (``FTLAB_DEBUG=1`` shows the traceback)."""
    try:
        run()
    except USER_ERRORS as err:
        cause = _ftlab_cause(err)
        if os.environ.get("FTLAB_DEBUG") or cause is None:
            raise
        message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
        print(f"ftlab: error: {message}", file=sys.stderr)
        sys.exit(2)


def _ftlab_cause(err: BaseException) -> BaseException | None:
    """The innermost error in ``err``'s chain raised by ftlab's own checks (jsonargparse wraps
    errors from ``__init__`` in its own), or None for errors from anywhere else."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = traceback.extract_tb(err.__traceback__)
        if frames and frames[-1].filename.startswith(_PACKAGE) and isinstance(err, USER_ERRORS):
            found = err
        err = err.__cause__ or err.__context__
    return found


if __name__ == "__main__":
    main()
