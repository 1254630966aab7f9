"""The eval command line, behind both entry points: ``mmsmall eval ...`` and ``python -m eval ...``.

    mmsmall eval --model PATH --tasks chartqa,docvqa --data chartqa=/data/ChartQA --out DIR

Under torchrun (``torchrun --nproc-per-node 8 -m eval ...``) the samples are split across ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mmsmall.logs import setup_logging


def parse_data(items: Sequence[str]) -> dict[str, str]:
    """``["chartqa=/a", "docvqa=/b,textvqa=/c"]`` -> ``{"chartqa": "/a", ...}``; exits naming a bad item."""
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                raise SystemExit(f"--data {part!r}: expected TASK=PATH, e.g. chartqa=/data/ChartQA")
            task, path = part.split("=", 1)
            out[task.strip()] = path.strip()
    return out


def build_parser(prog: str = "python -m eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description="Run the chart/document/counting/pointing suite with standard metrics."
    )
    ap.add_argument(
        "--model", help="a saved mmsmall model, run, checkpoint, our HF release or a stock Molmo2 folder"
    )
    ap.add_argument("--tasks", help="comma-separated task names (see --list-tasks)")
    ap.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    ap.add_argument("--data", action="append", default=[], help="TASK=PATH (repeatable; or comma-separated)")
    ap.add_argument(
        "--out", default="eval_out", help="output folder (predictions cache, results.json, results.md)"
    )
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override each task's pinned budget")
    ap.add_argument(
        "--blind",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace every image with a mid-grey one of the same size (blind baseline)",
    )
    ap.add_argument(
        "--other-images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ask each question about another sample's image of the same task (image-reliance baseline)",
    )
    ap.add_argument(
        "--molmo-style",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Molmo task-style prompts and 'Answer:' extraction instead of lmms-eval prompts",
    )
    ap.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: this rank's GPU, else cpu)"
    )
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-crops", type=int, default=None, help="high-resolution crops per image")
    return ap  # fmt: skip


def main(argv: Sequence[str] | None = None, prog: str = "python -m eval") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list_tasks:
        from eval.tasks import TASKS

        for name, t in sorted(TASKS.items()):
            print(f"{name:20s} {t.default_data or '(--data DIR)':28s} {t.description}")
        return 0
    if not args.model or not args.tasks:
        ap.error(f"give --model and --tasks (task names: {prog} --list-tasks)")
    data = parse_data(args.data)
    setup_logging()
    from eval.runner import evaluate

    results = evaluate(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        args.out,
        batch_size=args.batch_size,
        limit=args.limit,
        data=data,
        blind=args.blind,
        other_images=args.other_images,
        max_new_tokens=args.max_new_tokens,
        num_workers=args.num_workers,
        molmo_style=args.molmo_style,
        device=args.device,
        dtype=args.dtype,
        max_crops=args.max_crops,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if results:
        from eval.report import markdown_table

        print(markdown_table(results))
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
