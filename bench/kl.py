"""Reverse-KL forward+backward: naive vs the paper-style 256-token chunks vs ours, time and memory.

One command measures, in the same run, for T in {1024, 4096, 8192} and bf16 student/teacher
logits ``[T, V]``:

* ``naive``: fp32 ``log_softmax`` of both, ``sum(p_s * (log p_s - log p_t))``, plain autograd;
* ``chunked256``: the same formula over 256-token chunks, concatenated, one autograd backward
  (the chunks' graphs stay alive until backward, as in a straightforward chunked loss);
* ``compiled`` (CUDA only): ``naive`` under ``torch.compile``, the strongest thing a user gets
  without a custom kernel;
* ``ours_torch`` (CUDA only): ``opsdc_megatron.loss.vocab_parallel_reverse_kl(backend="torch")``;
* ``ours``: ``vocab_parallel_reverse_kl`` with its default backend (Triton on CUDA, torch on CPU).

A second table puts the output layer in front (hidden ``[T, H]``, output weights ``[V, H]`` of
student and teacher, bf16): ``matmuls`` (the output layer alone: student forward and backward,
teacher forward: its matmul-bound time), ``unfused`` (those logits, then ``ours``) and ``fused``
(``opsdc_megatron.loss.fused_output_reverse_kl``, its weight given megatron DDP's fp32 ``main_grad``
first, as in training). Its extra memory counts everything beyond the hidden states and weights,
including their gradients (fused: the weight's is in ``main_grad``, not counted); "w/o grads"
subtracts the gradients that exist at the peak, which any output layer must produce: the forward's and the
backward's peaks are taken separately (the fused path's weight-gradient placeholder comes only at the end of
its backward, after its chunks are freed). On CPU memory counts once its pages are written, so the placeholder
(``torch.empty``, never written) is not seen there and the forward's peak decides. Hidden 4096 on CUDA, 512 on CPU.

On CUDA the run also measures the device's copy bandwidth (bytes read + written per second) and
prints each KL time against the 3-pass floor: read both logits once, write the gradient once.

Each case is ``loss = kl.sum(); loss.backward()`` on a student leaf (gradient kept in ``.grad``).
It prints the time (best of the timed repetitions after one untimed run: the machines are shared; on CUDA the
repetitions are enqueued back to back, so the CPU's launch latency hides behind the previous one's kernels as
in a training step it hides behind the model's) and the peak *extra*
memory: everything allocated beyond the two input tensors during forward+backward, INCLUDING the
student's gradient (1x one bf16 logits tensor), as absolute numbers and as ratios to ``naive``.

How memory is measured:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` taken after the
  inputs exist and the peak statistics were reset (the caching allocator's exact byte count). V
  defaults to 151936 (Qwen3's vocabulary).
* CPU: torch has no CPU peak-allocation counter, and ``tracemalloc`` does not see torch's
  allocations, so every case runs in its own subprocess and the kernel's resident-set high-water
  mark is used: after the inputs exist (and a small warm-up run has initialised the autograd
  engine and thread pools), the process resets its peak RSS (``echo 5 > /proc/self/clear_refs``,
  Linux >= 4.0), records VmRSS, runs forward+backward, and reads VmHWM; extra = VmHWM - VmRSS
  before. The subprocess sets ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every large
  tensor with its own mmap and unmaps it on free, so RSS follows torch's live allocations (with
  glibc's default dynamic threshold, freed blocks below 32 MiB may stay resident, which would
  only inflate the numbers). All buffers are written, so every allocated page is resident. The
  result is within a few MiB (page granularity, small allocator overhead) of the true peak of
  torch's allocations. The time comes from a second subprocess with glibc's default malloc
  (the fixed threshold makes every block's temporaries fresh page-faulted mmaps, which is not how
  the code runs normally). V defaults to 32768 on CPU.

Usage: ``python bench/kl.py [--device cpu|cuda] [--vocab V] [--hidden H] [--tokens 1024 4096 8192] [--reps N]``.
``--profile IMPL ...`` runs, instead of the tables, one step of each named case (``ours``, ``fused``, ...) at each T
under ``torch.profiler`` and prints where its time goes, kernel by kernel, and how much of the step's wall time no
kernel ran (Python, launches, waits): what a gap between the measured time and the floor is made of.
``python bench/kl.py --case IMPL T V`` runs one CPU case and prints one JSON line (used by the
driver and by tests/test_kl.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opsdc_megatron.loss import fused_output_reverse_kl, vocab_parallel_forward_kl, vocab_parallel_reverse_kl  # noqa: E402

PAPER_CHUNK = 256
CPU_IMPLS = ("naive", "chunked256", "ours")
CUDA_IMPLS = ("naive", "chunked256", "compiled", "ours_torch", "ours")
OUTPUT_IMPLS = ("matmuls", "unfused", "fused")
CPU_HIDDEN = 512


def naive_reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_ps = torch.log_softmax(student.float(), dim=-1)
    log_pt = torch.log_softmax(teacher.float(), dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1)


def chunked_reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            naive_reverse_kl(student[i : i + PAPER_CHUNK], teacher[i : i + PAPER_CHUNK])
            for i in range(0, student.shape[0], PAPER_CHUNK)
        ]
    )


FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "naive": naive_reverse_kl,
    "chunked256": chunked_reverse_kl,
    "ours": vocab_parallel_reverse_kl,
    "ours_torch": lambda student, teacher: vocab_parallel_reverse_kl(student, teacher, backend="torch"),
    "ours_forward_kl": vocab_parallel_forward_kl,  # the ablation's loss, for tests
    # For tests, memory only (--reps 0): the gradient is written over the student leaf's values
    # through a view of it, as over an output layer's logits.
    "ours_grad_in_place": lambda student, teacher: vocab_parallel_reverse_kl(student.view_as(student), teacher, grad_in_place=True),
}
MEMORY_ONLY_IMPLS = ("ours_grad_in_place",)


def _inputs(tokens: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    # Drawn directly in bf16: no fp32 transient while the inputs are made.
    student = 3 * torch.randn(tokens, vocab, generator=generator, device=device, dtype=torch.bfloat16)
    teacher = 3 * torch.randn(tokens, vocab, generator=generator, device=device, dtype=torch.bfloat16)
    return student.requires_grad_(True), teacher


def _step(fn: Callable, student: torch.Tensor, teacher: torch.Tensor) -> None:
    student.grad = None
    fn(student, teacher).sum().backward()


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def measure_cpu_case(impl: str, tokens: int, vocab: int, reps: int) -> dict[str, float]:
    """In this process: peak extra RSS of one forward+backward, then the best time of `reps`."""
    fn = FUNCTIONS[impl]
    small_s, small_t = _inputs(8, vocab, "cpu")
    _step(fn, small_s, small_t)  # warm-up: autograd engine, thread pools, lazy init
    del small_s, small_t
    student, teacher = _inputs(tokens, vocab, "cpu")
    gc.collect()
    _reset_peak_rss()
    before = _proc_status_kib("VmRSS")
    _step(fn, student, teacher)
    extra = (_proc_status_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _step(fn, student, teacher)
        times.append(time.perf_counter() - start)
    logits_bytes = student.numel() * student.element_size()
    return {"extra_bytes": extra, "logits_bytes": logits_bytes, "time_s": min(times) if times else 0.0}


def _subprocess_case(impl: str, tokens: int, vocab: int, reps: int, fixed_mmap: bool, hidden: int) -> dict[str, float]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", impl, str(tokens), str(vocab), "--reps", str(reps), "--hidden", str(hidden)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cpu_case(impl: str, tokens: int, vocab: int, reps: int = 0, hidden: int = CPU_HIDDEN) -> dict[str, float]:
    """Memory from a fresh subprocess with the fixed mmap threshold (own RSS high-water mark);
    time from another fresh subprocess with glibc's default malloc (how the code normally runs).
    `hidden`: the output-layer cases' hidden size."""
    result = _subprocess_case(impl, tokens, vocab, 0, True, hidden)
    if reps:
        result["time_s"] = _subprocess_case(impl, tokens, vocab, reps, False, hidden)["time_s"]
    return result


def _cuda_time_and_peak(step: Callable[[], None], reps: int) -> tuple[float, int]:
    """Peak bytes allocated by one ``step`` beyond what was live before it, and its best time."""
    step()  # warm-up (compilation, autotuning, allocator)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # Enqueued back to back, events around each: a repetition's launches (Python, autograd) overlap the previous
    # one's kernels, as in training they overlap the model's, so a short kernel is not charged the CPU's latency
    # before its first launch. A step that waits for the GPU itself (the fused path's backward) still pays it.
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return min((start.elapsed_time(end) / 1e3 for start, end in events), default=float("nan")), extra  # --reps 0: memory only


def measure_cuda_case(impl: str, tokens: int, vocab: int, reps: int) -> dict[str, float]:
    fn = FUNCTIONS[impl] if impl != "compiled" else torch.compile(naive_reverse_kl, dynamic=False)
    student, teacher = _inputs(tokens, vocab, "cuda")

    def step() -> None:
        _step(fn, student, teacher)
        student.grad = None  # the gradient is counted at its peak, then freed for the next rep

    time_s, extra = _cuda_time_and_peak(step, reps)
    del student, teacher
    torch.cuda.empty_cache()
    return {"extra_bytes": extra, "logits_bytes": tokens * vocab * 2, "time_s": time_s}


class OutputCase(NamedTuple):
    """One output-layer case: ``forward()`` runs the forward and returns what runs the backward (and frees the
    gradients); the bytes of gradients that exist after the forward and after the backward."""

    forward: Callable[[], Callable[[], None]]
    forward_grad_bytes: int
    grad_bytes: int

    def step(self) -> None:
        self.forward()()


def _output_case(impl: str, tokens: int, vocab: int, hidden: int, device: str) -> OutputCase:
    """Hidden states, weights and, for ``fused``, megatron DDP's fp32 ``main_grad`` made first, as in training."""
    generator = torch.Generator(device=device).manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator, device=device, dtype=torch.bfloat16).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, hidden, generator=generator, device=device, dtype=torch.bfloat16)
    student_weight = (0.02 * torch.randn(vocab, hidden, generator=generator, device=device, dtype=torch.bfloat16)).requires_grad_(True)
    teacher_weight = (0.02 * torch.randn(vocab, hidden, generator=generator, device=device, dtype=torch.bfloat16))
    upstream = torch.randn(tokens, vocab, generator=generator, device=device, dtype=torch.bfloat16) if impl == "matmuls" else None
    token_weights = torch.ones(tokens, device=device)
    if impl == "fused":  # as megatron DDP prepares every parameter: backward then returns its placeholder gradient
        student_weight.main_grad = torch.zeros(vocab, hidden, device=device)
        student_weight.grad_added_to_main_grad = False

    def forward() -> Callable[[], None]:
        if impl == "matmuls":
            logits = student_hidden @ student_weight.t()
            with torch.no_grad():
                teacher_hidden @ teacher_weight.t()
            loss, upstream_grad = logits, upstream
        elif impl == "unfused":
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.t()
            # the gradient over the logits, as the trainer calls it (distill/forward.py)
            loss, upstream_grad = vocab_parallel_reverse_kl(student_hidden @ student_weight.t(), teacher_logits, grad_in_place=True).sum(), None
            del teacher_logits  # saved by the KL until its backward
        else:
            loss, upstream_grad = fused_output_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, token_weights).loss, None

        def backward() -> None:
            nonlocal loss
            loss.backward(upstream_grad)
            del loss
            student_weight.grad_added_to_main_grad = False  # as DDP's zero_grad resets it
            student_hidden.grad = student_weight.grad = None

        return backward

    # fused: the weight's gradient is in the preallocated main_grad; the [V, H] bf16 gradient it leaves is the
    # placeholder megatron's hook discards (megatron's own linear layers return one too); the hidden states'
    # gradient exists from its forward on
    return OutputCase(forward, tokens * hidden * 2 if impl == "fused" else 0, (tokens + vocab) * hidden * 2)


def _output_result(tokens: int, vocab: int, hidden: int, time_s: float, peaks: tuple[int, int], case: OutputCase) -> dict[str, float]:
    """``peaks``: the extra bytes at the forward's peak and at the backward's (from before the forward)."""
    forward_peak, backward_peak = peaks
    return {"extra_bytes": max(peaks), "logits_bytes": tokens * vocab * 2, "time_s": time_s,
            # beyond the gradients that exist at each peak; a lower bound where one came before all of them
            "extra_bytes_without_grads": max(forward_peak - case.forward_grad_bytes, backward_peak - case.grad_bytes),
            "matmul_flop": 2 * tokens * vocab * hidden * 4}


def measure_cuda_output_case(impl: str, tokens: int, vocab: int, hidden: int, reps: int) -> dict[str, float]:
    case = _output_case(impl, tokens, vocab, hidden, "cuda")
    time_s, _ = _cuda_time_and_peak(case.step, reps)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    backward = case.forward()
    torch.cuda.synchronize()
    forward_peak = torch.cuda.max_memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    backward()
    torch.cuda.synchronize()
    result = _output_result(tokens, vocab, hidden, time_s, (forward_peak, torch.cuda.max_memory_allocated() - before), case)
    del case, backward
    torch.cuda.empty_cache()
    return result


def measure_cpu_output_case(impl: str, tokens: int, vocab: int, hidden: int, reps: int) -> dict[str, float]:
    """In this process, as `measure_cpu_case`: peak extra RSS of the forward and of the backward of one step (the
    high-water mark reset between them), then the best time of `reps` steps."""
    _output_case(impl, 8, vocab, hidden, "cpu").step()  # warm-up
    case = _output_case(impl, tokens, vocab, hidden, "cpu")
    gc.collect()
    _reset_peak_rss()
    before = _proc_status_kib("VmRSS")
    backward = case.forward()
    forward_peak = (_proc_status_kib("VmHWM") - before) * 1024
    _reset_peak_rss()
    backward()
    peaks = forward_peak, (_proc_status_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        case.step()
        times.append(time.perf_counter() - start)
    return _output_result(tokens, vocab, hidden, min(times) if times else 0.0, peaks, case)


def profile_case(impl: str, tokens: int, vocab: int, hidden: int, device: str) -> str:
    """One step of ``impl`` under ``torch.profiler`` after a warm-up: the ops and kernels by their own time,
    then the step's wall time against the time kernels ran (CUDA; on CPU, the time ops ran)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if impl in OUTPUT_IMPLS:
        step = _output_case(impl, tokens, vocab, hidden, device).step
    else:
        fn, (student, teacher) = FUNCTIONS[impl], _inputs(tokens, vocab, device)

        def step() -> None:
            _step(fn, student, teacher)
            student.grad = None

    cuda = device == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    step()
    synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        start = time.perf_counter()
        step()
        synchronize()
        wall_s = time.perf_counter() - start
    events = profiler.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    # On CUDA the device's own events (kernels, copies), as the table's total counts them; on CPU ops nest, so the
    # top-level ones.
    busy_us = sum(
        event.self_device_time_total for event in events if event.device_type == DeviceType.CUDA and not event.is_user_annotation
    ) if cuda else sum(event.cpu_time_total for event in profiler.events() if event.cpu_parent is None)
    del step
    if cuda:
        torch.cuda.empty_cache()
    return (f"{impl}, T = {tokens}, V = {vocab}{f', hidden {hidden}' if impl in OUTPUT_IMPLS else ''}: "
            f"{wall_s * 1e3:.2f} ms wall under the profiler, {busy_us / 1e3:.2f} ms in {'kernels' if cuda else 'ops'}, "
            f"{max(0.0, wall_s * 1e3 - busy_us / 1e3):.2f} ms in neither\n{events.table(sort_by=sort_by, row_limit=15)}")


def cuda_copy_bandwidth(bytes_: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (best of 10)."""
    source = torch.empty(bytes_ // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    time_s, _ = _cuda_time_and_peak(lambda: target.copy_(source), 10)
    del source, target
    torch.cuda.empty_cache()
    return bytes_ / time_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden size of the output-layer table (4096 on CUDA, {CPU_HIDDEN} on CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", nargs="+", default=[], choices=sorted({*FUNCTIONS, *OUTPUT_IMPLS} - {"compiled", *MEMORY_ONLY_IMPLS}),
                        metavar="IMPL", help="instead of the tables: one step of each IMPL at each T under torch.profiler")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "T", "V"), help="internal: one CPU case, JSON out")
    args = parser.parse_args()
    if args.case:
        impl, tokens, vocab = args.case[0], int(args.case[1]), int(args.case[2])
        if impl in MEMORY_ONLY_IMPLS and args.reps:
            parser.error(f"--case {impl} measures memory only (it overwrites its inputs): pass --reps 0")
        if impl in OUTPUT_IMPLS:
            print(json.dumps(measure_cpu_output_case(impl, tokens, vocab, args.hidden or CPU_HIDDEN, args.reps)))
        else:
            print(json.dumps(measure_cpu_case(impl, tokens, vocab, args.reps)))
        return
    cuda = args.device == "cuda"
    vocab, hidden = args.vocab or (151936 if cuda else 32768), args.hidden or (4096 if cuda else CPU_HIDDEN)
    if args.profile:
        for tokens in args.tokens:
            for impl in args.profile:
                print(profile_case(impl, tokens, vocab, hidden, args.device), flush=True)
        return
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"reverse KL fwd+bwd, bf16 logits [T, {vocab}], {device_name}, torch {torch.__version__}")
    bandwidth = cuda_copy_bandwidth() if cuda else None
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); floor = 3 logits passes at that rate")
    print("extra memory counts everything beyond the two inputs, including the bf16 gradient (1.00x logits)")
    print("| T | impl | time | extra memory | x bf16 logits | time / naive | memory / naive |" + (" time / floor |" if cuda else ""))
    print("|" + "---|" * (8 if cuda else 7))
    for tokens in args.tokens:
        results = {}
        for impl in CUDA_IMPLS if cuda else CPU_IMPLS:
            results[impl] = measure_cuda_case(impl, tokens, vocab, args.reps) if cuda else run_cpu_case(impl, tokens, vocab, args.reps)
        base = results["naive"]
        for impl, r in results.items():
            floor = f" {r['time_s'] / (3 * r['logits_bytes'] / bandwidth):.2f} |" if bandwidth else ""
            print(
                f"| {tokens} | {impl} | {r['time_s'] * 1e3:.2f} ms | {r['extra_bytes'] / 2**20:.0f} MiB | "
                f"{r['extra_bytes'] / r['logits_bytes']:.2f} | {r['time_s'] / base['time_s']:.2f} | "
                f"{r['extra_bytes'] / base['extra_bytes']:.3f} |{floor}",
                flush=True,
            )
    print(f"\noutput layer + reverse KL fwd+bwd, hidden {hidden}, bf16; extra memory includes the hidden and weight gradients "
          "(fused: the weight's is in megatron DDP's preallocated fp32 main_grad, not counted)")
    print("| T | impl | time | TFLOP/s (matmuls) | extra memory | x bf16 logits | w/o grads x logits | time / matmuls |")
    print("|" + "---|" * 8)
    for tokens in args.tokens:
        results = {
            impl: measure_cuda_output_case(impl, tokens, vocab, hidden, args.reps) if cuda else run_cpu_case(impl, tokens, vocab, args.reps, hidden)
            for impl in OUTPUT_IMPLS
        }
        for impl, r in results.items():
            memory = "n/a (holds a [T, V] upstream gradient) | | | " if impl == "matmuls" else (
                f"{r['extra_bytes'] / 2**20:.0f} MiB | {r['extra_bytes'] / r['logits_bytes']:.2f} | "
                f"{r['extra_bytes_without_grads'] / r['logits_bytes']:.3f} | ")
            print(
                f"| {tokens} | {impl} | {r['time_s'] * 1e3:.2f} ms | {r['matmul_flop'] / r['time_s'] / 1e12:.3g} | "
                f"{memory}{r['time_s'] / results['matmuls']['time_s']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
