# Sourced by the setup scripts: `uv_install VENV ARG...` runs `uv pip install ARG...` into the virtual
# environment VENV, from the package sources pip is configured with (tools/pip_sources.py: its index,
# extra indexes, find-links folders and constraints).
# uv, not pip: on a 2-core machine (2026-11-28) pip took 184 s for .venv/ and 178 s for .venv-py312/ (several GB of
# torch and its CUDA libraries, megatron-core, transformers), uv 67 s and 74 s for the same versions, bytecode
# compiled; CI has an hour.
UV_VERSION=0.13.9
uv_install() {
    local venv=$1 sources
    shift
    # `uv --version`: "uv 0.13.9 (x86_64-unknown-linux-gnu)"; another version is replaced
    [[ "$("$venv/bin/uv" --version 2>/dev/null)" == "uv $UV_VERSION "* ]] || PIP_NO_CACHE_DIR=1 "$venv/bin/pip" install --quiet "uv==$UV_VERSION"
    sources=$("$venv/bin/python" "$(dirname "${BASH_SOURCE[0]}")/pip_sources.py")
    mapfile -t sources <<< "$sources"
    # No cache: no second copy of the wheels on disk (CI disks are small). Bytecode compiled now, as pip does: uv
    # leaves it to the first import by default, and where PYTHONDONTWRITEBYTECODE is set (this project's machines)
    # every process then compiles torch, megatron-core and transformers again (the py312 tests took 1866 s, not 861).
    UV_NO_CACHE=1 "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" "${sources[@]}" "$@"
}
