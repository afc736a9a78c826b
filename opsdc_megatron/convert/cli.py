"""`opsdc convert hf-to-megatron | megatron-to-hf | verify`: parsers and handlers.

Bad input (missing shards, config that does not match the weights, unsupported architecture, a
layout that does not divide the model, an existing output folder) exits with status 2 and one
message naming the problem, before anything is written; a failed conversion exits with 1 and
leaves no output folder; `verify` exits with 1 when the logits differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

INPUT_ERRORS = (ValueError, FileNotFoundError)
"""ConversionError and the model provider's named ValueErrors."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="Hugging Face <-> Megatron checkpoint conversion")
    actions = convert.add_subparsers(dest="convert_command", required=True)

    to_megatron = actions.add_parser("hf-to-megatron", help="HF folder -> megatron torch_dist checkpoint (model only)")
    to_megatron.add_argument("--hf", type=Path, required=True, help="Hugging Face model folder")
    to_megatron.add_argument("--out", type=Path, required=True, help="new checkpoint folder (must not exist)")
    to_megatron.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    to_megatron.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    to_megatron.add_argument(
        "--vp", type=int, default=None,
        help="virtual pipeline size: checked and recorded; the checkpoint's content does not depend on it",
    )
    to_megatron.set_defaults(handler=_hf_to_megatron)

    to_hf = actions.add_parser("megatron-to-hf", help="megatron torch_dist checkpoint (any layout) -> HF folder")
    to_hf.add_argument("--ckpt", type=Path, required=True, help="converted checkpoint or training checkpoints/step_N")
    to_hf.add_argument("--out", type=Path, required=True, help="new Hugging Face folder (must not exist)")
    to_hf.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="weights dtype (default: the checkpoint's)")
    to_hf.add_argument("--hf-config", type=Path, default=None, help="folder with config.json and tokenizer (default: found from --ckpt)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, GiB (default 5)")
    to_hf.set_defaults(handler=_megatron_to_hf)

    verify = actions.add_parser("verify", help="largest logit difference between a HF folder and a megatron checkpoint")
    verify.add_argument("--hf", type=Path, required=True)
    verify.add_argument("--ckpt", type=Path, required=True)
    verify.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed |logit difference| relative to the largest |logit| (default 1e-5)")
    verify.add_argument("--tokens", type=int, default=32, help="tokens per sequence, 2 sequences (default 32)")
    verify.set_defaults(handler=_verify)


def run(args: argparse.Namespace) -> None:
    """Dispatch a parsed `opsdc convert ...` command; exits 2 on bad input."""
    try:
        args.handler(args)
    except INPUT_ERRORS as error:
        print(f"opsdc convert {args.convert_command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as error:
        print(f"opsdc convert {args.convert_command}: failed: {error}", file=sys.stderr)
        sys.exit(1)


def _hf_to_megatron(args: argparse.Namespace) -> None:
    from opsdc_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    out = convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.vp)
    print(f"wrote {out} (TP={args.tp}, PP={args.pp})")


def _megatron_to_hf(args: argparse.Namespace) -> None:
    import torch

    from opsdc_megatron.convert.megatron_to_hf import export_in_this_process

    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    out = export_in_this_process(args.ckpt, args.out, args.hf_config, dtype, int(args.max_shard_gb * 1024**3))
    print(f"wrote {out}")


def _verify(args: argparse.Namespace) -> None:
    from opsdc_megatron.convert.checks import check_hf_folder, check_megatron_checkpoint
    from opsdc_megatron.convert.verify import logit_difference
    from opsdc_megatron.parallel import destroy_distributed, init_distributed

    if args.tokens < 1:  # exit 1 is for logits that differ
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    check_hf_folder(args.hf)
    check_megatron_checkpoint(args.ckpt)
    init_distributed(1, 1)
    try:
        difference = logit_difference(args.hf, args.ckpt, tokens_per_sequence=args.tokens)
    finally:
        destroy_distributed()
    within = difference.relative <= args.tolerance
    print(f"max |logit difference| = {difference.largest:.3e}, {difference.relative:.2e} of the largest |logit| "
          f"({difference.largest_logit:.3g}; tolerance {args.tolerance:.1e}): {'OK' if within else 'FAIL'}")
    if not within:
        sys.exit(1)
