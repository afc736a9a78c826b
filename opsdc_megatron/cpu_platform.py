"""Let megatron-core run on machines without a GPU (gloo backend, fp32, CPU tensors).

megatron-core assumes CUDA in a few places that are otherwise device-agnostic: it uses
``torch.cuda.current_device()`` as the device of new tensors, writes ``device="cuda"`` literally,
and calls ``torch.cuda.synchronize()`` around host copies. On a CPU-only machine every one of
these raises. This project's tests, toy demo and CI run on CPU, so we adapt exactly those spots.

How: each megatron module listed in ``_CUDA_ASSUMING_MODULES`` gets its module-global name
``torch`` rebound to a ``_CpuTorch`` view of torch. The view forwards every attribute to the
real torch, except that

* ``torch.cuda.current_device()`` returns ``torch.device("cpu")``,
* ``torch.cuda.synchronize()`` does nothing (CPU ops are synchronous),
* ``torch.cuda.current_stream()`` returns torch's own CPU stand-in ``torch.cpu.current_stream()``,
  whose ``wait_event``/``wait_stream`` do nothing (there are no CUDA events or streams to wait on),
* the tensor factories (``torch.zeros``, ``torch.tensor``, ...) map a CUDA ``device=`` to the CPU.

Why this shape: the alternatives are copying large upstream functions (schedules, DDP buffers,
checkpoint writers) into this project, which rots with every megatron release, or patching
``torch.cuda`` for the whole process, which would also change what transformers, the rollout
engine and torch itself see. Rebinding one global name in the listed modules touches nothing
outside them, and inside them only changes calls that would otherwise raise on a CPU machine.

One spot is not a torch call: ``clip_grad_by_total_norm_fp32`` asserts
``param.grad.type() == "torch.cuda.FloatTensor"``. That function (a dozen lines) is replaced by
`_clip_grad_by_total_norm_fp32`, which checks the dtype instead and scales with megatron's own
multi-tensor helper, as upstream does.

Two more are tensor methods. ``DistributedOptimizer.__init__`` and, for bf16 weights without the
distributed optimizer, ``Float16OptimizerWithFloat16Params.__init__`` sort parameters by
``param.type()`` strings ("torch.cuda.FloatTensor", ...) and reject any other; while they run,
``Tensor.type()`` without arguments names a CPU tensor's CUDA counterpart (the sorting only looks at
the dtype; nothing is moved). Its ``get_parameter_state_dp_zero`` (the gather behind the
"fully_reshardable" checkpoint format) moves buffers with ``Tensor.cuda()``. And with tied embeddings and pipeline stages, GPTModel's constructor runs
``LanguageModule.setup_embeddings_and_output_layer``, which moves the last stage's copy of the
embedding with ``weight.data.cuda()`` before all-reducing it with the first stage's. That method
runs with ``Tensor.cuda`` leaving a CPU tensor where it is, and so does the gather above (only
during those calls).

Not covered (not needed by this project on CPU): fp16 with its loss scaler, async checkpoint
saves, CUDA graphs, and sequence parallelism (needs apex or Transformer Engine norms).

Upstream code moves between releases. ``apply_cpu_platform`` imports every adapted module, checks
the names and signatures it relies on, and raises a ``RuntimeError`` naming what changed instead
of skipping it silently: a skipped module would surface later as an obscure
"Torch not compiled with CUDA enabled".
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

# (module, which of its code assumes CUDA). Rebinding `torch` there is safe because, on a machine
# without a GPU, each listed call would raise; with the view they allocate the same tensor on CPU.
_CUDA_ASSUMING_MODULES: tuple[tuple[str, str], ...] = (
    (
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() on the first "
        "forward; the CPU view keeps it on CPU.",
    ),
    (
        "megatron.core.transformer.utils",
        'get_default_causal_mask builds the causal mask with device="cuda" whenever '
        "attention_mask is None under the causal local spec.",
    ),
    (
        "megatron.core.tensor_parallel.layers",
        "Linear layers allocate weights (when not use_cpu_initialization) and all-gather "
        "buffers on torch.cuda.current_device().",
    ),
    (
        "megatron.core.tensor_parallel.mappings",
        "TP gather/reduce-scatter mappings allocate output buffers on torch.cuda.current_device().",
    ),
    (
        "megatron.core.tensor_parallel.utils",
        "split/gather of 1-D tensors allocates on torch.cuda.current_device().",
    ),
    (
        "megatron.core.utils",
        "GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device().",
    ),
    (
        "megatron.core.distributed.param_and_grad_buffer",
        "DDP's _ParamAndGradBuffer allocates the contiguous grad (and param) buffer on "
        "torch.cuda.current_device(). From megatron-core 0.19 (not in 0.16.1), "
        "_ParamAndGradBucketGroup.start_grad_sync also calls torch.cuda.current_stream() on every "
        "step, to wait on CUDA-graph gradient events that never exist on CPU.",
    ),
    (
        "megatron.core.optimizer.optimizer",
        'FP32Optimizer keeps its loss scale in a device="cuda" tensor; ChainedOptimizer falls '
        "back to one on torch.cuda.current_device().",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer gathers and scatters its state for checkpoints in buffers on "
        "torch.cuda.current_device().",
    ),
    (
        "megatron.core.optimizer.clip_grads",
        'get_grad_norm_fp32 and count_zeros_fp32 reduce the norm in device="cuda" tensors.',
    ),
    (
        "megatron.core.pipeline_parallel.schedules",
        'All three schedules count tokens in torch.zeros([], device="cuda").',
    ),
    (
        "megatron.core.pipeline_parallel.p2p_communication",
        "P2P receive and shape buffers live on torch.cuda.current_device(), and batched p2p "
        "calls torch.cuda.synchronize().",
    ),
    (
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        'save verification all-reduces device="cuda" / torch.cuda.current_device() tensors.',
    ),
    (
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "FileSystemWriterAsync.preload_tensors calls torch.cuda.synchronize() after the host copy.",
    ),
)

_FACTORIES: tuple[str, ...] = (
    "arange",
    "empty",
    "empty_like",
    "full",
    "ones",
    "tensor",
    "zeros",
    "zeros_like",
)

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    """True for every spelling of a CUDA device: "cuda", "cuda:0", torch.device("cuda"), 0."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that a CUDA `device=` keyword allocates on the CPU instead."""

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


def _no_synchronize(device: Any = None) -> None:
    """CPU kernels run synchronously: there is nothing to wait for."""


def _cpu_current_device() -> torch.device:
    """The device megatron should allocate on when it asks for "the current GPU"."""
    return _CPU


def _cpu_current_stream(device: Any = None) -> torch.cpu.Stream:
    """torch's CPU stream stand-in: waiting on it does nothing, as CPU ops are synchronous.

    Needed from megatron-core 0.19, whose DDP grad sync asks for the current CUDA stream every step
    (to wait on CUDA-graph events, which a CPU run never has); 0.16.1 does not call it on CPU.
    """
    return torch.cpu.current_stream()


class _CpuCuda:
    """``torch.cuda`` as the listed modules see it: CPU device and stream, no-op synchronize."""

    current_device = staticmethod(_cpu_current_device)
    current_stream = staticmethod(_cpu_current_stream)
    synchronize = staticmethod(_no_synchronize)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch:
    """``torch`` as the listed megatron modules see it; everything else is the real torch."""

    cuda = _CpuCuda()

    def __init__(self) -> None:
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


def _clip_grad_by_total_norm_fp32(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """megatron's clip_grad_by_total_norm_fp32 with its CUDA type-string assertion as a dtype check.

    Upstream asserts ``param.grad.type() == "torch.cuda.FloatTensor"``, which a CPU fp32 gradient
    ("torch.FloatTensor") fails. Everything else is upstream's: the same gradients, the same
    coefficient, scaled with upstream's own multi-tensor helper.
    """
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is None:
            continue
        allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
        if grad.dtype not in allowed:
            raise TypeError(f"gradient clipping expects {allowed} gradients, got {grad.dtype}")
        grads.append(clip_grads.to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        overflow = torch.zeros(1, dtype=torch.int, device=_CPU)
        clip_grads.multi_tensor_applier(clip_grads.multi_tensor_scale_impl, overflow, [grads, grads], clip_coeff)


# Modules whose global `clip_grad_by_total_norm_fp32` is replaced: the definition and the
# optimizers that imported it by name.
_CLIP_GRAD_MODULES: tuple[str, ...] = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
)
_CLIP_GRAD_PARAMETERS = ("parameters", "max_norm", "total_norm", "use_decoupled_grad")
_CLIP_GRAD_HELPERS = ("to_local_if_dtensor", "multi_tensor_applier", "multi_tensor_scale_impl")


def _keep_on_cpu(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Tensor.cuda`` for the wrapped calls: the tensor stays where it is."""
    return tensor


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.type``, naming CPU tensors as their CUDA counterparts ("torch.cuda.FloatTensor")."""
    name = _ORIGINAL_TENSOR_TYPE(tensor, *args, **kwargs)
    if args or kwargs or tensor.is_cuda:
        return name
    return name.replace("torch.", "torch.cuda.", 1)


def _with_tensor_method(name: str, replacement: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator: the method runs with ``torch.Tensor.<name>`` replaced, and only while it runs."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, replacement)
            try:
                return method(*args, **kwargs)
            finally:
                setattr(torch.Tensor, name, original)

        wrapper.cpu_platform_wrapped = True
        return wrapper

    return wrap


# (module, class, method, how it runs): the tensor-method adaptations described above.
_TENSOR_METHOD_ADAPTATIONS = (
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer", _with_tensor_method("cuda", _keep_on_cpu)),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__",
     _with_tensor_method("type", _cuda_type_name)),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__",
     _with_tensor_method("type", _cuda_type_name)),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "get_parameter_state_dp_zero",
     _with_tensor_method("cuda", _keep_on_cpu)),
)


def _adapt_tensor_methods() -> None:
    for module_name, class_name, method_name, wrap in _TENSOR_METHOD_ADAPTATIONS:
        owner = getattr(_import(module_name), class_name, None)
        method = getattr(owner, method_name, None)
        if method is None:
            raise RuntimeError(
                f"opsdc_megatron.cpu_platform: {module_name}.{class_name}.{method_name} is gone in this "
                f"megatron-core version; find where its CUDA-assuming code moved and update this module"
            )
        if not getattr(method, "cpu_platform_wrapped", False):
            setattr(owner, method_name, wrap(method))


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeError(
            f"opsdc_megatron.cpu_platform: megatron-core module {module_name!r} is gone in this "
            f"megatron-core version; find where its CUDA-assuming code moved and update this module"
        ) from error


def _rebind_torch(module_name: str) -> None:
    module = _import(module_name)
    bound = getattr(module, "torch", None)
    if bound is not torch and bound is not _CPU_TORCH:
        raise RuntimeError(
            f"opsdc_megatron.cpu_platform: {module_name!r} no longer binds the global name 'torch' "
            f"to the torch module; its CUDA assumptions need a different adaptation"
        )
    module.torch = _CPU_TORCH


def _replace_function(module_name: str, name: str, replacement: Callable[..., Any], parameters: tuple[str, ...]) -> None:
    """Replaces `module_name.name` by `replacement` after checking upstream still has the expected parameters."""
    module = _import(module_name)
    upstream = getattr(module, name, None)
    if upstream is replacement:
        return
    if upstream is None or tuple(inspect.signature(upstream).parameters) != parameters:
        raise RuntimeError(
            f"opsdc_megatron.cpu_platform: {module_name}.{name} is missing or its parameters changed "
            f"(expected {parameters}); update its CPU replacement {replacement.__name__} to the new upstream version"
        )
    setattr(module, name, replacement)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Activation recomputation saves "the GPU's" RNG state around each recomputed layer: the CPU's."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


# megatron's activation recomputation (tensor_parallel.random.CheckpointFunction) saves and restores
# the CUDA RNG state through these two functions; their signatures are checked before replacing.
_RNG_STATE_FUNCTIONS = {
    "_get_cuda_rng_state": (_cpu_get_rng_state, ("device", "clone", "graph_safe")),
    "_set_cuda_rng_state": (_cpu_set_rng_state, ("new_state", "device", "graph_safe")),
}


def apply_cpu_platform() -> None:
    """Adapt megatron-core's CUDA-only code paths to CPU; idempotent, a no-op when CUDA is present.

    Call it before building models, DDP wrappers, optimizers, schedules or checkpoints (after is
    fine too: the adapted functions look their globals up at call time).

    Raises:
        RuntimeError: this megatron-core version moved or changed code adapted here.
    """
    if torch.cuda.is_available():
        return
    for module_name, _cuda_assumption in _CUDA_ASSUMING_MODULES:
        _rebind_torch(module_name)
    clip_grads = _import("megatron.core.optimizer.clip_grads")
    missing = [name for name in _CLIP_GRAD_HELPERS if not hasattr(clip_grads, name)]
    if missing:
        raise RuntimeError(
            f"opsdc_megatron.cpu_platform: megatron.core.optimizer.clip_grads no longer has {missing}; "
            f"update _clip_grad_by_total_norm_fp32 to the new upstream version"
        )
    for module_name in _CLIP_GRAD_MODULES:
        _replace_function(module_name, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32, _CLIP_GRAD_PARAMETERS)
    for name, (replacement, parameters) in _RNG_STATE_FUNCTIONS.items():
        _replace_function("megatron.core.tensor_parallel.random", name, replacement, parameters)
    _adapt_tensor_methods()
