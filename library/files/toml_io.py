"""Every TOML file this trainer reads or writes goes through here: the standard library's TOML 1.0 parser
(`tomllib`, or its backport `tomli` on Python 3.10) and `tomli-w` to write.

The `toml` 0.10 package sd-scripts uses drops data without an error (``a = [{b=1}, 2]`` loads as
``{'a': [{'b': 1}]}``) and rejects valid TOML 1.0, so a file could silently train something else than it says.

`read_toml` turns every way a file can be unreadable (missing, a folder, not UTF-8, truncated, not TOML) into one
`TomlFileError` whose message says what is wrong; each caller prefixes it with the flag and file it is about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (tomli>=1.1 in requirements.txt)
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

__all__ = ["TomlFileError", "dumps", "loads", "read_toml", "tomllib"]

TOMLDecodeError = tomllib.TOMLDecodeError


class TomlFileError(ValueError):
    """A TOML file that cannot be used. The message is one line that reads on after the file's name
    ("is not valid TOML: ...", "is not UTF-8 text ...", "not found"): callers write f"{what} {path} {error}"."""


def loads(text: str) -> dict[str, Any]:
    """Parse TOML text; TomlFileError (one line) if it is not valid TOML 1.0."""
    try:
        return tomllib.loads(text)
    except TOMLDecodeError as error:
        raise TomlFileError(f"is not valid TOML: {_decode_reason(error)}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """The file's tables; TomlFileError with a one-line reason for any file that is not usable TOML.

    A UTF-8 byte-order mark (Notepad writes one) is skipped; other encodings are refused with what to do."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TomlFileError("not found") from None
    except IsADirectoryError:
        raise TomlFileError("is a folder, not a file") from None
    except OSError as error:
        raise TomlFileError(f"cannot be read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TomlFileError(
            f"is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    return loads(text)


def dumps(tables: dict[str, Any]) -> str:
    """TOML 1.0 text of `tables` (str, int, float, bool, lists and tables; None cannot be written)."""
    return tomli_w.dumps(tables)


def _decode_reason(error: Exception) -> str:
    message = " ".join(str(error).split())
    if "escape" in message.lower() or "hex value" in message:  # the usual cause: "C:\Users\..." in double quotes
        message += "; in double quotes a backslash starts an escape: write Windows paths in 'single quotes'"
    return message
