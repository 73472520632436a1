"""Run a script as Windows would see this project's own code: the Unix-only standard modules cannot be imported
from it.

    python tests/run_without_unix_modules.py train_network.py --pretrained_model_name_or_path ... [flags]

An import of one of `UNIX_ONLY` made by a file under the project (or under the folders in $UNIX_BLOCK_FROM,
separated by os.pathsep) raises ModuleNotFoundError, as on Windows, even when a library already imported the module
(the `import` statement is checked, not only the module search). Third-party packages keep their imports: they pick
their Windows code by platform (psutil's Linux backend imports `resource`, its Windows one does not), so refusing
them here would test this machine, not Windows.
"""

from __future__ import annotations

import builtins
import importlib.abc
import os
import runpy
import sys
from pathlib import Path

UNIX_ONLY = frozenset(
    {
        "resource",
        "fcntl",
        "termios",
        "tty",
        "pty",
        "pwd",
        "grp",
        "syslog",
        "crypt",
        "spwd",
        "nis",
        "posix",
        "_posixsubprocess",
        "_posixshmem",
    }
)
ROOT = Path(__file__).resolve().parent.parent
_SKIP = ("<frozen importlib", str(Path(importlib.__file__).parent))


class BlockUnixOnly(importlib.abc.MetaPathFinder):
    """Refuses `UNIX_ONLY` modules to importers under `roots` (tests excepted): in `import` statements through
    `builtins.__import__` (which sees cached modules too), and in importlib.import_module through the module search."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [str(root.resolve()) + os.sep for root in roots]
        self.tests = str(ROOT / "tests") + os.sep
        # Installed packages keep their imports even when the environment lives inside the checkout (.venv/).
        self.installed = tuple(str(Path(p).resolve()) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
        self._import = builtins.__import__

    def install(self) -> None:
        sys.meta_path.insert(0, self)
        builtins.__import__ = self.checked_import

    def checked_import(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and globals is not None:
            self.check(name, globals.get("__file__") or "")
        return self._import(name, globals, locals, fromlist, level)

    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
            frame = frame.f_back
        self.check(name, frame.f_code.co_filename if frame is not None else "")
        return None

    def check(self, name: str, importer: str) -> None:
        if name.split(".")[0] not in UNIX_ONLY or not importer or importer.startswith("<"):
            return
        importer = str(Path(importer).resolve())
        if importer.startswith(self.installed) or importer.startswith(self.tests):
            return
        if any(importer.startswith(root) for root in self.roots):
            raise ModuleNotFoundError(f"No module named {name!r} (Unix-only, imported by {importer})", name=name)


def main() -> None:
    roots = [ROOT, *(Path(p) for p in os.environ.get("UNIX_BLOCK_FROM", "").split(os.pathsep) if p)]
    BlockUnixOnly(roots).install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
