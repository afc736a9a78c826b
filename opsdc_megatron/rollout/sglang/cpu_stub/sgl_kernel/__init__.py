"""Stand-in for the CUDA-only `sgl_kernel` package, for SGLang servers on machines without a GPU.

SGLang's CPU path (`--device cpu`, torch_native attention, pytorch sampling) imports `sgl_kernel`
and a few of its submodules at module level but calls none of its kernels. The PyPI wheel cannot
even be imported without libcuda, so the launcher puts this folder's parent first on the server's
PYTHONPATH when no GPU is present. Every attribute is a placeholder that raises when called, so a
code path that really needs a kernel fails loudly, naming the kernel, instead of computing garbage.
Never used on GPU machines, where the real package is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+cpu-stub"


class KernelUnavailable:
    """A placeholder for one `sgl_kernel` attribute: raises when called."""

    def __init__(self, qualified_name: str) -> None:
        self._qualified_name = qualified_name

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"{self._qualified_name} was called, but sgl_kernel is the CPU stand-in of opsdc_megatron "
            f"(the CUDA kernels cannot run here): this SGLang code path needs a GPU"
        )

    def __getattr__(self, name: str) -> "KernelUnavailable":
        if name.startswith("__"):
            raise AttributeError(name)
        return KernelUnavailable(f"{self._qualified_name}.{name}")

    def __repr__(self) -> str:
        return f"<unavailable kernel {self._qualified_name}>"


def _stub_getattr(module_name: str):
    def __getattr__(name: str) -> KernelUnavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return KernelUnavailable(f"{module_name}.{name}")

    return __getattr__


class _StubSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any `sgl_kernel.x.y` import yields a stub module of the same kind."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _stub_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


__getattr__ = _stub_getattr(__name__)
sys.meta_path.insert(0, _StubSubmodules())
