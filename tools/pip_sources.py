"""Print, one per line, the `uv pip install` options that make uv look for packages where pip would.

uv does not read pip's configuration. This reads it through `pip config list` (pip's config files and
PIP_* variables; a variable over the `install` section over `global`, as pip) and passes on the
index, the extra indexes, the find-links folders, the constraints, the trusted hosts and --no-index
(pip's `cert` is not: uv reads SSL_CERT_FILE). A machine that keeps
wheels on disk (this project's keep torch's CPU build in a find-links folder) or reaches PyPI through
a mirror then installs what pip would. Across indexes uv takes the best version, as pip does
(`--index-strategy unsafe-best-match`; uv's default stops at the first index that has the package).
"""

from __future__ import annotations

import ast
import subprocess
import sys

OPTIONS = {
    "index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
SCOPES = ("global", "install", ":env:")  # lowest precedence first
TRUE, FALSE = ("y", "yes", "t", "true", "on", "1"), ("n", "no", "f", "false", "off", "0")  # pip's strtobool


def is_true(name: str, value: str) -> bool:
    if value.lower() in TRUE + FALSE:
        return value.lower() in TRUE
    raise SystemExit(f"pip_sources.py: pip config {name}={value!r}: expected one of {', '.join(TRUE + FALSE)}")


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    settings: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if scope not in SCOPES or (key not in OPTIONS and key != "no-index"):
            continue
        value = ast.literal_eval(value)  # printed as repr: a list on several lines keeps its newlines
        rank = SCOPES.index(scope)
        if value.strip() and (key not in settings or rank >= settings[key][0]):  # pip skips empty values
            settings[key] = (rank, value)
    options = ["--index-strategy", "unsafe-best-match"]
    for key, (_, value) in settings.items():
        if key == "no-index":
            if is_true(key, value.strip()):
                options.append("--no-index")
            continue
        for item in value.split():
            options += [OPTIONS[key], item]
    print("\n".join(options))


if __name__ == "__main__":
    main()
