"""TP=2 checks of the vocabulary-parallel KL divergences (run by tests/test_kl.py under torchrun).

Every rank builds the same full-vocabulary logits from a fixed seed, keeps its own slice of the
vocabulary (unequal slices when V is odd), and compares the sharded result and its shard of the
gradient with a float64 full-vocabulary reference. All checks share one launch because each
launch costs ~10 s of start-up. Rank 0 prints one line per check and a final marker.

The module also provides the float64 reference used by the single-process tests.
"""

from __future__ import annotations

import os
import sys
import zlib
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from opsdc_megatron.loss import fused_output_reverse_kl, vocab_parallel_forward_kl, vocab_parallel_reverse_kl

DONE_MARKER = "KL_WORKER_ALL_CHECKS_PASSED"
FP32_RTOL = 1e-5
# bf16 inputs are computed in fp32, so values keep the fp32 tolerance; the student gradient is
# returned in bf16, whose rounding is at most 2**-9 relative per element.
BF16_GRAD_RTOL = 2.0**-8

KLFunction = Callable[..., Tensor]
DIRECTIONS: dict[str, KLFunction] = {"reverse": vocab_parallel_reverse_kl, "forward": vocab_parallel_forward_kl}


def reference_kl(
    student: Tensor, teacher: Tensor, direction: str, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """float64 full-vocabulary KL per token and d(sum(kl * weight))/d(student) by plain autograd.

    Inputs must be finite (callers drop padding columns first); the reference is independent of
    the hand-written backward it checks.
    """
    s = student.detach().double().requires_grad_(True)
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(teacher.detach().double(), dim=-1)
    if direction == "reverse":
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    elif direction == "forward":
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:
        raise ValueError(direction)
    if weight is None:
        weight = torch.ones_like(kl)
    (grad,) = torch.autograd.grad((kl * weight.double()).sum(), s)
    return kl.detach(), grad


def rel_err(value: Tensor, reference: Tensor) -> float:
    """max |value - reference| / max |reference|: relative to the tensor's scale, not per element."""
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((value.double() - reference).abs().max() / scale).item())


def _shard(full: Tensor, rank: int, world: int) -> Tensor:
    return torch.tensor_split(full, world, dim=-1)[rank].contiguous()


class Checker:
    """Runs named checks on this rank; rank 0 reports the measured errors."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self.group = dist.group.WORLD

    def report(self, name: str, **errors: float) -> None:
        if self.rank == 0:
            details = " ".join(f"{key}={value:.3e}" for key, value in errors.items())
            print(f"KLCHECK tp={self.world} {name} {details}", flush=True)

    def run_sharded(
        self, direction: str, student_full: Tensor, teacher_full: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """KL values and this rank's gradient shard, plus the values gathered from every rank."""
        student = _shard(student_full, self.rank, self.world).requires_grad_(True)
        teacher = _shard(teacher_full, self.rank, self.world)
        kl = DIRECTIONS[direction](student, teacher, self.group)
        (kl * weight).sum().backward()
        gathered = [torch.empty_like(kl) for _ in range(self.world)]
        dist.all_gather(gathered, kl.detach().contiguous(), group=self.group)
        return kl.detach(), student.grad, torch.stack(gathered)

    def against_reference(
        self,
        name: str,
        direction: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        scale: float = 3.0,
        grad_rtol: float = FP32_RTOL,
    ) -> None:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # same on every rank
        student = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        teacher = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        weight = torch.rand(shape[:-1], generator=generator)
        kl, grad, gathered = self.run_sharded(direction, student, teacher, weight)
        ref_kl, ref_grad = reference_kl(student, teacher, direction, weight)
        ref_grad = _shard(ref_grad, self.rank, self.world)
        value_err, grad_err = rel_err(kl, ref_kl), rel_err(grad, ref_grad)
        assert kl.dtype == torch.float32 and kl.shape == torch.Size(shape[:-1]), (kl.dtype, kl.shape)
        assert grad.dtype == dtype
        assert value_err <= FP32_RTOL, (name, value_err)
        assert grad_err <= grad_rtol, (name, grad_err)
        assert torch.equal(gathered[0], gathered[-1]), f"{name}: ranks disagree on the value"
        self.report(name, value_rel=value_err, grad_rel=grad_err)

    def padding(self, direction: str, real_vocab: int, padded_vocab: int) -> None:
        """-inf padding columns (the last shard may be all padding): same KL, zero padding grads."""
        generator = torch.Generator().manual_seed(real_vocab)
        shape = (3, 4, padded_vocab)
        student = torch.full(shape, float("-inf"))
        teacher = torch.full(shape, float("-inf"))
        student[..., :real_vocab] = 2 * torch.randn(3, 4, real_vocab, generator=generator)
        teacher[..., :real_vocab] = 2 * torch.randn(3, 4, real_vocab, generator=generator)
        weight = torch.rand(3, 4, generator=generator)
        kl, grad, _ = self.run_sharded(direction, student, teacher, weight)
        ref_kl, ref_grad = reference_kl(student[..., :real_vocab], teacher[..., :real_vocab], direction, weight)
        full_ref_grad = torch.zeros(shape, dtype=torch.float64)
        full_ref_grad[..., :real_vocab] = ref_grad
        ref_shard = _shard(full_ref_grad, self.rank, self.world)
        padding_cols = _shard(torch.arange(padded_vocab) >= real_vocab, self.rank, self.world)
        assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
        assert (grad[..., padding_cols] == 0).all()
        value_err, grad_err = rel_err(kl, ref_kl), rel_err(grad, ref_shard)
        assert value_err <= FP32_RTOL and grad_err <= FP32_RTOL, (value_err, grad_err)
        self.report(f"{direction}_padding_{real_vocab}of{padded_vocab}", value_rel=value_err, grad_rel=grad_err)

    def masked_tokens(self) -> None:
        generator = torch.Generator().manual_seed(7)
        student = torch.randn(2, 6, 33, generator=generator)
        teacher = torch.randn(2, 6, 33, generator=generator)
        mask = torch.ones(2, 6)
        mask[0, 4:] = 0
        mask[1, :2] = 0
        local = _shard(student, self.rank, self.world).requires_grad_(True)
        kl = vocab_parallel_reverse_kl(local, _shard(teacher, self.rank, self.world), self.group)
        ((kl * mask).sum() / mask.sum()).backward()
        assert (local.grad[mask == 0] == 0).all()
        assert (local.grad[mask == 1] != 0).any()
        _, ref_grad = reference_kl(student, teacher, "reverse", mask / mask.sum())
        grad_err = rel_err(local.grad, _shard(ref_grad, self.rank, self.world))
        assert grad_err <= FP32_RTOL, grad_err
        self.report("masked_tokens", grad_rel=grad_err)

    def large_logits(self, direction: str) -> None:
        """Logits of magnitude 1e4: finite, non-negative, and close to the reference.

        Spread 1e4 saturates the softmax; offset 1e4 with spread 3 keeps it spread out, where a
        formula that differences raw logits or log-sum-exps would lose ~1e-3 to cancellation. The
        "nearby" teachers put the true KL near 0, where rounding could go negative.
        """
        generator = torch.Generator().manual_seed(11)
        shape = (5, 3, 64)
        saturated = 1e4 * torch.randn(shape, generator=generator)
        offset = 1e4 + 3 * torch.randn(shape, generator=generator)
        cases = {
            "spread_independent": (saturated, 1e4 * torch.randn(shape, generator=generator)),
            "spread_nearby": (saturated, saturated + torch.randn(shape, generator=generator)),
            "offset_independent": (offset, -1e4 + 3 * torch.randn(shape, generator=generator)),
            "offset_nearby": (offset, offset + 0.01 * torch.randn(shape, generator=generator)),
        }
        for label, (student, teacher) in cases.items():
            kl, grad, _ = self.run_sharded(direction, student, teacher, torch.ones(shape[:-1]))
            assert torch.isfinite(kl).all() and (kl >= 0).all() and torch.isfinite(grad).all(), label
            ref_kl, ref_grad = reference_kl(student, teacher, direction)
            ref_grad = _shard(ref_grad, self.rank, self.world)
            abs_err = float((kl.double() - ref_kl).abs().max())
            grad_abs_err = float((grad.double() - ref_grad).abs().max())
            assert torch.allclose(kl.double(), ref_kl, rtol=FP32_RTOL, atol=1e-6), (label, abs_err)
            assert grad_abs_err <= 1e-6, (label, grad_abs_err)
            self.report(
                f"{direction}_magnitude_1e4_{label}",
                value_abs=abs_err,
                max_kl=float(ref_kl.max()),
                grad_abs=grad_abs_err,
                max_grad=float(ref_grad.abs().max()),
            )

    def teacher_gets_no_grad(self) -> None:
        student = _shard(torch.randn(4, 21), self.rank, self.world).requires_grad_(True)
        teacher = _shard(torch.randn(4, 21), self.rank, self.world).requires_grad_(True)
        for fn in DIRECTIONS.values():
            fn(student, teacher, self.group).sum().backward()
        assert teacher.grad is None and student.grad is not None
        self.report("teacher_gets_no_grad")

    def identical_inputs(self) -> None:
        logits = _shard(torch.randn(3, 5, 41), self.rank, self.world)
        for direction, fn in DIRECTIONS.items():
            student = logits.clone().requires_grad_(True)
            kl = fn(student, logits, self.group)
            kl.sum().backward()
            assert (kl == 0).all() and (student.grad == 0).all(), direction
        self.report("identical_inputs_exact_zero")

    def tiles(self) -> None:
        """Tiles of 1 and 3 tokens (14 tokens: the last tile partial) and of pieces of 10 of a
        token's 34 or 33 columns: reference values and gradients, and still exactly two all-reduces
        per forward (one MAX, one SUM) for all tokens, none in backward."""
        generator = torch.Generator().manual_seed(41)
        shape = (2, 7, 67)  # local vocab 34 and 33
        student = 3 * torch.randn(shape, generator=generator)
        teacher = 3 * torch.randn(shape, generator=generator)
        weight = torch.rand(shape[:-1], generator=generator)
        original = dist.all_reduce
        for direction, fn in DIRECTIONS.items():
            ref_kl, ref_grad = reference_kl(student, teacher, direction, weight)
            for tile, chunk_bytes in (("1_token", 34 * 12), ("3_tokens", 3 * 34 * 12), ("10_columns", 10 * 12)):
                ops: list[object] = []

                def counting(*args: object, **kwargs: object) -> object:
                    ops.append(kwargs.get("op"))
                    return original(*args, **kwargs)

                local = _shard(student, self.rank, self.world).requires_grad_(True)
                dist.all_reduce = counting  # type: ignore[assignment]
                try:
                    kl = fn(local, _shard(teacher, self.rank, self.world), self.group, chunk_bytes=chunk_bytes)
                    (kl * weight).sum().backward()
                finally:
                    dist.all_reduce = original  # type: ignore[assignment]
                assert ops == [dist.ReduceOp.MAX, dist.ReduceOp.SUM], ops
                value_err = rel_err(kl.detach(), ref_kl)
                grad_err = rel_err(local.grad, _shard(ref_grad, self.rank, self.world))
                assert value_err <= FP32_RTOL and grad_err <= FP32_RTOL, (direction, tile, value_err, grad_err)
                self.report(f"{direction}_tiles_of_{tile}_two_allreduces", value_rel=value_err, grad_rel=grad_err)

    def fused_output_layer(self) -> None:
        """The output layer fused into the reverse KL, output weight split over the ranks by rows
        (last 3 of 40 rows are vocabulary padding): the float64 reference's values, the summed
        hidden-state gradient and each rank's weight-gradient shard, chunks of 6 tokens in groups of 18."""
        generator = torch.Generator().manual_seed(51)
        tokens, hidden, vocab, real = 23, 12, 40, 37
        student_hidden, teacher_hidden = torch.randn(2, tokens, hidden, generator=generator)
        student_weight = torch.randn(vocab, hidden, generator=generator)
        teacher_weight = student_weight + 0.3 * torch.randn(vocab, hidden, generator=generator)
        weight = torch.rand(tokens, generator=generator)
        shard = vocab // self.world
        rows = slice(self.rank * shard, (self.rank + 1) * shard)
        padding = slice(min(max(real - rows.start, 0), shard), shard)
        local_hidden = student_hidden.clone().requires_grad_(True)
        local_weight = student_weight[rows].clone().requires_grad_(True)
        loss, kl = fused_output_reverse_kl(
            local_hidden, local_weight, teacher_hidden, teacher_weight[rows], weight, self.group,
            vocab_padding=padding, chunk_bytes=4 * 6 * shard * 4,  # 24 fp32 rows held: chunks of 6, groups of 18
        )
        loss.backward()
        grad_hidden = local_hidden.grad.clone()
        dist.all_reduce(grad_hidden, group=self.group)  # what copy_to_tensor_model_parallel_region does
        ref_kl, ref_grad_logits = reference_kl(
            student_hidden.double() @ student_weight[:real].double().t(),
            teacher_hidden.double() @ teacher_weight[:real].double().t(), "reverse", weight,
        )
        ref_grad_weight = torch.zeros(vocab, hidden, dtype=torch.float64)
        ref_grad_weight[:real] = ref_grad_logits.t() @ student_hidden.double()
        errors = {
            "value_rel": rel_err(kl.detach(), ref_kl),
            "hidden_grad_rel": rel_err(grad_hidden, ref_grad_logits @ student_weight[:real].double()),
            "weight_grad_rel": rel_err(local_weight.grad, ref_grad_weight[rows]),
        }
        assert all(e <= FP32_RTOL for e in errors.values()), errors
        self.report("fused_output_layer", **errors)

    def group_of_one(self) -> None:
        """A size-1 process group holds the full vocabulary: the same as tp_group=None."""
        single, _ = dist.new_subgroups(group_size=1)
        student, teacher = torch.randn(3, 29), torch.randn(3, 29)
        for direction, fn in DIRECTIONS.items():
            assert torch.equal(fn(student, teacher, single), fn(student, teacher, None)), direction
        self.report("group_of_one_equals_none")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)  # identical full logits on every rank
    check = Checker(rank, world)
    if sys.argv[1:] == ["triton"]:
        triton_checks(check)
    else:
        torch_checks(check)
    dist.barrier()
    if rank == 0:
        print(DONE_MARKER, f"world={world} pid={os.getpid()}", flush=True)
    dist.destroy_process_group()


def torch_checks(check: Checker) -> None:
    check.against_reference("reverse_fp32_BTV", "reverse", (2, 3, 101))
    check.against_reference("reverse_fp32_TV", "reverse", (17, 257))
    check.against_reference("reverse_fp32_wide", "reverse", (2, 4099), scale=8.0)
    check.against_reference("forward_fp32_BTV", "forward", (2, 3, 101))
    check.against_reference("forward_fp32_TV", "forward", (17, 257))
    check.against_reference("reverse_bf16_BTV", "reverse", (2, 5, 129), torch.bfloat16, grad_rtol=BF16_GRAD_RTOL)
    check.against_reference("forward_bf16_BTV", "forward", (2, 5, 129), torch.bfloat16, grad_rtol=BF16_GRAD_RTOL)
    for direction in DIRECTIONS:
        check.padding(direction, real_vocab=9, padded_vocab=16)
        check.padding(direction, real_vocab=5, padded_vocab=12)  # rank 1's shard is all padding
        check.large_logits(direction)
    check.masked_tokens()
    check.teacher_gets_no_grad()
    check.identical_inputs()
    check.group_of_one()
    check.tiles()
    check.fused_output_layer()


def triton_checks(check: Checker) -> None:
    """The reverse KL's Triton backend (interpreted on CPU) through the same sharded checks."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    DIRECTIONS.clear()
    DIRECTIONS["reverse"] = partial(vocab_parallel_reverse_kl, backend="triton")
    check.against_reference("reverse_fp32_TV", "reverse", (17, 257))
    check.against_reference("reverse_fp32_wide", "reverse", (2, 9001), scale=8.0)  # tiles of 4096
    # The interpreter casts fp32 to bf16 by truncation (<= 2**-7 relative), compiled kernels by RTNE.
    bf16_grad_rtol = 2.0**-7 if os.environ.get("TRITON_INTERPRET") == "1" else BF16_GRAD_RTOL
    check.against_reference("reverse_bf16_BTV", "reverse", (2, 5, 129), torch.bfloat16, grad_rtol=bf16_grad_rtol)
    check.padding("reverse", real_vocab=9, padded_vocab=16)
    check.padding("reverse", real_vocab=5, padded_vocab=12)  # rank 1's shard is all padding
    check.large_logits("reverse")
    check.teacher_gets_no_grad()
    check.identical_inputs()
    check.tiles()


if __name__ == "__main__":
    main()
