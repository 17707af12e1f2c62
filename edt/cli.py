"""The command-line parser of ``python -m edt.train``, ``edt.sample``, ``edt.evaluate`` and
``edt.extract_features``: a mistake is one line ``error: ...`` on stderr and exit status 2, and
``--help`` shows each default except where it is None or a switch (the help text says what
happens then)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .distributed import exit_status_of_peer_failure

__all__ = ["ArgumentParser", "HelpFormatter", "run_command", "json_object", "check_output_path"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where the default is None or a bool."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``ArgumentParser(prog, module_doc)``: the description is the first paragraph of
    ``module_doc``; command-line mistakes end in one line ``error: ...``, exit status 2."""

    def __init__(self, prog: str, module_doc: str, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=module_doc.split("\n\n")[0], **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def require_at_least(self, args: argparse.Namespace, minimum: float, names: Sequence[str]) -> None:
        """A usage error for the first of ``names`` (attributes of ``args``) whose value is not
        ``>= minimum`` (NaN included); None, a flag not given, passes."""
        for name in names:
            value = getattr(args, name)
            if value is not None and not value >= minimum:
                self.error(f"--{name.replace('_', '-')} must be >= {minimum:g}, got {value:g}")

    @contextlib.contextmanager
    def usage_errors(self):
        """A ``ValueError`` raised in the block (a check that names its flag) is a usage error."""
        try:
            yield
        except ValueError as e:
            self.error(str(e))


def json_object(flag: str, text: str) -> dict:
    """``text`` (the value of ``flag``) parsed as a JSON object; ``ValueError`` naming ``flag`` when it
    is not valid JSON or not an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {type(value).__name__} {text!r}")
    return value


def check_output_path(flag: str, path, kind: str = "directory") -> None:
    """``ValueError`` naming ``flag`` unless ``path`` can be written as ``kind`` ("directory" or
    "file"): it is one already or is absent, and its nearest existing ancestor is a directory
    (the missing ones are created). Checked before a command starts its work."""
    path = Path(path)
    if path.exists():
        if kind == "directory" and not path.is_dir():
            raise ValueError(f"{flag} {str(path)!r} is a file; expected a directory (created when missing)")
        if kind == "file" and path.is_dir():
            raise ValueError(f"{flag} {str(path)!r} is a directory; expected a file path")
        return
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is a file; expected a directory there")
            return


def run_command(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]]) -> int:
    """Exit status of ``main(argv)``: 0; 2 with one line ``error: ...`` on stderr when it raises
    ``ValueError`` (bad input); 1 with one such line when another rank of a distributed job died
    (any other error is raised)."""
    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        return exit_status_of_peer_failure(e)
    return 0
