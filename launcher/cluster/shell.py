"""The only place shell text is built: quoting for bash and for `#SBATCH` lines, a marker for raw shell.

Every value that reaches a script goes through `quote` (bash) or `sbatch_value` (`#SBATCH` lines,
which sbatch parses itself and never expands). The one opt-out is `Raw`: shell text the user wrote
on purpose (their `cluster.setup` lines), inserted as written. Values that cannot be made safe in
their context (a line break in an `#SBATCH` value, a NUL byte anywhere) raise ConfigError naming
the key.
"""
from __future__ import annotations

import re
import shlex
from typing import Iterable, Union

from launcher.config.schema import ENV_NAME as _ENV_NAME, SBATCH_OPTION as _SBATCH_OPTION
from launcher.config.errors import ConfigError, Problem


class Raw(str):
    """Shell text inserted as written: only for text the user wrote as shell on purpose."""


Value = Union[str, int, Raw]

# Characters sbatch reads literally in an unquoted `#SBATCH` argument (no space, quote, \, #).
_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def _refuse(key: str, message: str, fix: str) -> ConfigError:
    return ConfigError([Problem(key, message, fix)], "job script")


def check_text(value: str, key: str, *, line_breaks: bool = True) -> str:
    """value if it can be put in a script at all: no NUL, and no line break unless allowed."""
    if "\0" in value:
        raise _refuse(key, "contains a NUL byte, which no shell script can hold", "remove it")
    if not line_breaks and ("\n" in value or "\r" in value):
        raise _refuse(key, f"contains a line break ({value!r}), which cannot be made safe in "
                      "this place of the job script", "remove the line break")
    return value


def quote(value: Value, key: str = "value") -> str:
    """One bash word that expands to exactly value (Raw text is returned as written)."""
    if isinstance(value, Raw):
        return str(check_text(value, key))
    if isinstance(value, bool):
        raise TypeError(f"{key}: booleans have no shell spelling; pass a string")
    if isinstance(value, int):
        return str(value)
    return shlex.quote(check_text(value, key))


def join(words: Iterable[Value], key: str = "value") -> str:
    """A command line: every word quoted (Raw words as written)."""
    return " ".join(quote(w, key) for w in words)


def export(name: str, value: str, key: str) -> str:
    """`export NAME='value'`; the name must be a plain environment variable name."""
    if not _ENV_NAME.fullmatch(name):
        raise _refuse(key, f"{name!r} is not a valid environment variable name",
                      "use letters, digits and _, not starting with a digit")
    return f"export {name}={quote(value, key)}"


def require_set(name: str, message: str, key: str) -> str:
    """`: "${NAME:?message}"`: the script stops there, saying message, when NAME is unset or empty
    (its value is never written). message is plain text: no $ ` " ' \\ } or line break."""
    if not _ENV_NAME.fullmatch(name):
        raise _refuse(key, f"{name!r} is not a valid environment variable name",
                      "use letters, digits and _, not starting with a digit")
    if re.search(r'[$`"\'\\}\n\r\0]', message):
        raise ValueError(f"not plain text for ${{{name}:?...}}: {message!r}")
    return f': "${{{name}:?{message}}}"'


def sbatch_value(value: Value, key: str) -> str:
    """value spelled for an `#SBATCH` line, which sbatch parses itself (quotes and \\ escapes,
    `#` starts a comment) without ever expanding variables or commands."""
    text = check_text(str(value), key, line_breaks=False)
    if _SBATCH_PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_line(option: str, value: Value | None, key: str) -> str:
    """`#SBATCH --option=value` (or `#SBATCH --flag` when value is None)."""
    if not _SBATCH_OPTION.fullmatch(option):
        raise _refuse(key, f"{option!r} is not an sbatch long option", "write it as --name")
    if value is None:
        return f"#SBATCH {option}"
    return f"#SBATCH {option}={sbatch_value(value, key)}"


def comment(text: str) -> str:
    """text made safe for a `#` comment line: line breaks and control characters escaped."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


def slurm_filename(path: str, key: str) -> str:
    """A literal path for Slurm's filename patterns (`--output`): `%` doubled so Slurm keeps it.
    A backslash would switch off every pattern (`%j` included), so it is refused."""
    if "\\" in path:
        raise _refuse(key, f"{path!r} contains a backslash, which switches off Slurm's %j in "
                      "log file names", "use a path without backslashes")
    return check_text(path, key, line_breaks=False).replace("%", "%%")
