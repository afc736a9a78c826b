"""Stand-ins for CUDA-built packages that SGLang's CPU server imports at module level but never calls.

SGLang's CPU path (`--device cpu`, torch_native attention, pytorch sampling) imports `sgl_kernel`
and, through its multimodal model configs, `torchvision`, yet serves a text model without calling
either. Their PyPI wheels are CUDA builds that cannot load beside the CPU torch of .venv-sglang
(tools/setup_sglang.sh), so the launcher puts this folder first on the server's PYTHONPATH when no
GPU is present. Every attribute of a stand-in, and of any of its submodules, is a placeholder that
raises when called, so a code path that really needs the package fails loudly, naming what it
called, instead of computing garbage. Never used on GPU machines, where the real packages load.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Callable


class Unavailable:
    """A placeholder for one attribute of a stand-in package: raises when called."""

    def __init__(self, qualified_name: str) -> None:
        self._qualified_name = qualified_name

    def __call__(self, *args: object, **kwargs: object) -> None:
        package = self._qualified_name.split(".")[0]
        raise NotImplementedError(
            f"{self._qualified_name} was called, but {package} is the CPU stand-in of opsdc_megatron "
            f"(its CUDA build cannot load here): this SGLang code path needs a GPU machine's SGLang install"
        )

    def __getattr__(self, name: str) -> "Unavailable":
        if name.startswith("__"):
            raise AttributeError(name)
        return Unavailable(f"{self._qualified_name}.{name}")

    def __repr__(self) -> str:
        return f"<unavailable {self._qualified_name}>"


def _module_getattr(module_name: str) -> Callable[[str], Unavailable]:
    def __getattr__(name: str) -> Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return Unavailable(f"{module_name}.{name}")

    return __getattr__


class _StandInSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any `package.x.y` import yields a stand-in module of the same kind."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def make_stand_in(package_globals: dict[str, Any]) -> None:
    """Turns the calling package `__init__` into a stand-in (attributes and submodules)."""
    package = package_globals["__name__"]
    package_globals["__getattr__"] = _module_getattr(package)
    sys.meta_path.insert(0, _StandInSubmodules(package))
