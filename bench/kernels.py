"""Soft-target loss, forward and backward: pipebd's fused Triton kernel against torch eager,
torch.compile and Liger-Kernel, side by side in one run, on a GPU.

    python bench/kernels.py                                 # rows 4096 and 16384; V 1000, 32000, 128256; fp32, bf16
    python bench/kernels.py --rows 8192 --vocab 32000 --dtype bf16 --append BENCHMARKS.md
    python bench/kernels.py --smoke                         # tiny shapes on CPU (Triton interpreter):
                                                            # checks the script, measures nothing

Every implementation computes ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over rows and
its gradient wrt the student logits ``s`` (the teacher is constant), as a user would write it:

- eager:   ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True) * T^2`` in the
           input dtype;
- compile: the same function under ``torch.compile``;
- liger:   the two log-softmaxes in torch, then Liger-Kernel's ``LigerKLDIVLoss`` (its kernel takes
           log-probabilities and leaves temperature and T^2 to the caller); skipped when
           ``liger_kernel`` is not installed (install it in the bench environment only);
- pipebd:  ``pipebd.soft_target_loss(s, t, T, backend="triton")``.

Time: median of ``triton.testing.do_bench`` over forward + backward. GB/s counts the floor of
memory traffic, one read of ``s`` and ``t`` and one write of the gradient, whatever an
implementation really moves; "% copy" compares that with the device's copy bandwidth
(``dst.copy_(src)`` of 1 GiB, read + write), measured in the same run as the ceiling. Peak extra
memory is the allocator's peak during one step above what was allocated before it, in units of
the gradient's size (1.0x: nothing but the gradient). "max |dgrad|" is each gradient's largest
difference from pipebd's.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.nn.functional as F

import pipebd

from common import publish

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = 2.0


def eager(s, t, T):
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="batchmean",
                    log_target=True) * T * T


def implementations(smoke: bool) -> dict:
    impls = {"eager": eager}
    if not smoke:
        # One compiled graph per shape and dtype (dynamic=False): measure_case starts each case
        # from a fresh dynamo cache, since past the recompile limit (8) torch.compile silently
        # runs eager; should a case still reach it, fail rather than time eager as "compile".
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        impls["compile"] = torch.compile(eager, dynamic=False)
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        print("liger_kernel is not installed: its column is skipped", file=sys.stderr)
    else:
        liger = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        impls["liger"] = lambda s, t, T: liger(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)) * T * T
    impls["pipebd"] = lambda s, t, T: pipebd.soft_target_loss(s, t, T, backend="triton")
    return impls


def liger_version() -> str:
    try:
        return f"liger-kernel {version('liger-kernel')}"
    except PackageNotFoundError:
        return "liger-kernel not installed"


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    return lambda fn: (fn(), float("nan"))[1]      # smoke: run once, time nothing


def copy_bandwidth(device: str, measure) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on 1 GiB."""
    if device != "cuda":
        return float("nan")
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds


def step(fn, s, t):
    s.grad = None
    fn(s, t, TEMPERATURE).backward()


def measure_case(impls, rows: int, vocab: int, dtype: torch.dtype, device: str, measure, copy_bw: float) -> list[str]:
    g = torch.Generator(device=device).manual_seed(0)
    s = (3 * torch.randn(rows, vocab, generator=g, device=device)).to(dtype).requires_grad_()
    t = (3 * torch.randn(rows, vocab, generator=g, device=device)).to(dtype)
    floor = 3 * rows * vocab * s.element_size()
    torch._dynamo.reset()                          # the compile column: a fresh graph for this case
    results = {}
    for name, fn in impls.items():
        try:
            step(fn, s, t)                         # compile / autotune outside the timing
            grad = s.grad.clone()
            s.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step(fn, s, t)
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - before) / (rows * vocab * s.element_size())
            else:
                extra = float("nan")
            results[name] = (measure(lambda: step(fn, s, t)), extra, grad)
        except torch.OutOfMemoryError:
            results[name] = None
        s.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    ours = results["pipebd"] or (float("nan"), None, None)
    lines = []
    for name, result in results.items():
        label = f"| {rows} | {vocab} | {str(dtype).removeprefix('torch.')} | {name} |"
        if result is None:
            lines.append(f"{label} out of memory | | | | | |")
            continue
        seconds, extra, grad = result
        diff = float("nan") if ours[2] is None else (grad.float() - ours[2].float()).abs().max().item()
        lines.append(f"{label} {seconds * 1e3:.3f} | {floor / seconds / 1e9:.0f} | {floor / seconds / copy_bw:.0%} | "
                     f"{seconds / ours[0]:.2f}x | {extra:.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1000, 32000, 128256])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1: checks that the script runs")
    parser.add_argument("--append", metavar="PATH", help="append the result as markdown to PATH")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # read when pipebd.kernels is first imported
        device, args.rows, args.vocab, args.dtype = "cpu", [4], [37], ["fp32"]
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("needs a CUDA GPU (timings of Triton's CPU interpreter mean nothing); --smoke checks the script")
    measure = timer(device)
    impls = implementations(args.smoke)
    copy_bw = copy_bandwidth(device, measure)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run, no timings)"
    import triton
    header = [f"Device: {gpu}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write, 1 GiB); "
              f"triton {triton.__version__}; {liger_version()}; T = {TEMPERATURE}", "",
              "| rows | V | dtype | impl | fwd+bwd ms | GB/s (floor bytes) | % copy | time vs pipebd | "
              "peak extra (x grad) | max \\|dgrad\\| |", "|---|---|---|---|---|---|---|---|---|---|"]
    print(*header, sep="\n", flush=True)
    lines = [line for rows in args.rows for vocab in args.vocab for dtype in args.dtype
             for line in measure_case(impls, rows, vocab, DTYPES[dtype], device, measure, copy_bw)]
    publish("Soft-target loss kernels, forward + backward", "kernels.py", argv, header + lines, args.append)


if __name__ == "__main__":
    main()
