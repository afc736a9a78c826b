"""Print, one per line, the `uv pip install` options that make uv look for packages where pip would.

uv does not read pip's configuration. This reads it through `pip config list` (pip's config files and
PIP_* variables; a variable over the `install` section over `global`, as pip) and passes on the
index, the extra indexes, the find-links folders, the constraints and --no-index. A machine that keeps
wheels on disk (this project's keep torch's CPU build in a find-links folder) or reaches PyPI through
a mirror then installs what pip would. Across indexes uv takes the best version, as pip does
(`--index-strategy unsafe-best-match`; uv's default stops at the first index that has the package).
"""

from __future__ import annotations

import ast
import subprocess
import sys

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
SCOPES = ("global", "install", ":env:")  # lowest precedence first


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    settings: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if scope in SCOPES and (key in OPTIONS or key == "no-index"):
            rank = SCOPES.index(scope)
            if key not in settings or rank >= settings[key][0]:
                settings[key] = (rank, ast.literal_eval(value))  # printed as repr: a list on several lines keeps its newlines
    options = ["--index-strategy", "unsafe-best-match"]
    for key, (_, value) in settings.items():
        if key == "no-index":
            if value.lower() in ("1", "true", "yes", "on"):
                options.append("--no-index")
            continue
        for item in value.split():
            options += [OPTIONS[key], item]
    print("\n".join(options))


if __name__ == "__main__":
    main()
