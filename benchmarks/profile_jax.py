"""Where the time of a JAX transformer forward or training step goes, kernel by kernel (GPU).

Runs the same programs as benchmarks/transformer.py (its `forward` / `train` set-up) under `jax.profiler.trace`
with a Perfetto trace, then sums the device kernels by name. Prints one JSON line per kernel name among the top
`--top` (total ms per call, share of device time, launches per call) and one line of totals by category
(matmul libraries, the model's Pallas kernels, fusions, copies, other), with how long a call spans on the device
and how much of that span no kernel ran (`timeline`), so a change can be predicted and checked against the
breakdown. With `--hlo-dir` each kernel also gets its JAX op, each fusion the HBM bytes it moves per
launch and the rate it moved them at, the totals are split by pass and part of the model, and the summary gets
the FLOPs of the program's cuBLAS GEMMs and their rate over the matmul time (`hlo_costs`).

GPU:  source benchmarks/gpu-env.sh && python3 benchmarks/profile_jax.py forward --model sana_600m --batch 32
CPU:  python benchmarks/profile_jax.py forward --tiny   (host threads only; a smoke test of the plumbing)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# The `name=` of the pallas_calls of the model (sana_jax.glu_conv, sana_jax.linear_attention), of CAME
# (sana_jax.came_kernels) and of the training step (sana_jax.layer_stack): their kernels keep it.
PALLAS_KERNELS = ("silu_glu_dwconv", "glu_dwconv_bwd_total", "glu_dwconv_bwd_input", "litela_state", "litela_output",
                  "litela_query_grad", "litela_key_grad", "came_square_sums", "came_confidence", "stack_layers")


def category(name: str) -> str:
    if name.startswith(PALLAS_KERNELS):
        return "pallas"
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cublas", "cutlass", "nvjet", "sm90_xmma", "matmul", "dot")):
        return "matmul"
    if any(k in lowered for k in ("flash", "fmha", "cudnn", "attention")):
        return "attention"
    if "fusion" in lowered or "triton" in lowered:
        return "fusion"
    if "copy" in lowered or "memcpy" in lowered or "memset" in lowered:
        return "copy"
    return "other"


def device_events(trace_dir: str) -> list[dict]:
    """Complete events of the device (GPU) timelines of the newest Perfetto trace under trace_dir."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    # GPU kernels sit under "/device:GPU:N" processes; without a GPU (smoke test) take the XLA ops of the host.
    pids = {pid for pid, name in names.items() if "/device:" in name} or \
        {pid for pid, name in names.items() if "/host:CPU" in name}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]


def op_names(path: str) -> dict[str, str]:
    """Kernel name -> JAX op_name of every instruction of one optimized HLO dump (kernels are named after their HLO
    instruction with "." -> "_")."""
    sources = {}
    with open(path) as f:
        for line in f:
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
            if match:
                sources.setdefault(match.group(1).replace(".", "_"), match.group(2))
    return sources


def profiled_hlo(hlo_dir: str, kernel_names: set[str]) -> str | None:
    """The optimized HLO dump of the profiled program (run with XLA_FLAGS=--xla_dump_to=hlo_dir): of every program
    compiled (parameter init, the step...), the dump that names the most of the trace's kernels."""
    best, best_count = None, 0
    for path in glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt")):
        count = len(kernel_names & op_names(path).keys())
        if count > best_count:
            best, best_count = path, count
    return best


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|bf16|[fsu](?:8|16|32|64))\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ")


def _arrays(text: str) -> list[tuple[str, list[int]]]:
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(text)]


def _bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in _arrays(text))


def hlo_costs(path: str) -> tuple[dict[str, int], dict[str, int]]:
    """From one optimized HLO dump: (kernel name -> HBM bytes of each fusion, instruction name -> FLOPs of each
    cuBLAS GEMM, named as `hlo_op` names it).

    A fusion's bytes are its fused computation's parameters and results, each counted once: what an ideal kernel
    reads and writes (an in-place update of a slice counts its whole buffer). A GEMM's FLOPs are 2 x its output's
    elements x the contracted size of its left operand, for one execution: one inside a while loop (the scanned
    blocks) runs once per iteration (`gemm_flops`)."""
    with open(path) as f:
        lines = f.read().splitlines()
    computations, shapes, fusions, flops = {}, {}, {}, {}
    for line in lines:
        header = re.match(r"%([\w.\-]+) \((.*)\) -> (.*) \{$", line)
        if header:
            computations[header.group(1)] = _bytes(header.group(2)) + _bytes(header.group(3))
            continue
        match = _INSTRUCTION.match(line)
        if match:
            shapes[match.group(1)] = [dims for _, dims in _arrays(match.group(2))]
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        called = re.search(r" fusion\(.*calls=%([\w.\-]+)", line)
        if called and called.group(1) in computations:
            fusions[match.group(1).replace(".", "_")] = computations[called.group(1)]
        if re.search(r'custom_call_target="__cublas\$(?:lt\$matmul|gemm)"', line):
            lhs = re.search(r"custom-call\(%?([\w.\-]+(?:#\d+)?)", line).group(1)
            name, _, index = lhs.partition("#")
            contracted = int(re.search(r'"lhs_contracting_dimensions":\["(\d+)"\]', line).group(1))
            output = shapes[match.group(1)][0]
            flops[match.group(1).replace(".", "_")] = 2 * math.prod(output) * shapes[name][int(index or 0)][contracted]
    return fusions, flops


def gemm_flops(events: list[dict], flops: dict[str, int], calls: int) -> float:
    """FLOPs per call of the GEMMs the trace ran: each GEMM's FLOPs (`hlo_costs`) times its executions per call, the
    launches of its most launched kernel (a split-K GEMM also launches a reduction). 0 when no kernel is attributed
    to a GEMM (inside CUDA graphs, see `hlo_op`)."""
    launches = collections.Counter((hlo_op(e), e["name"]) for e in events if hlo_op(e) in flops)
    executions = collections.Counter()
    for (op, _), count in launches.items():
        executions[op] = max(executions[op], count / calls)
    return sum(flops[op] * n for op, n in executions.items())


def timeline(events: list[dict], calls: int, gaps: int = 5) -> dict:
    """How the device kernels fill the calls in time: the wall span of a call (its first kernel's start to its
    last kernel's end), the time some kernel ran (overlapping kernels counted once) and the idle rest, per call,
    plus the `gaps` longest idle gaps inside the calls with the kernel before each. The calls are told apart by
    the `calls - 1` longest idle gaps of the trace (each call is synced before the next is dispatched). A span
    longer than the busy time is time the device waited: launch gaps, host work in the call, synchronisations."""
    if not events:
        return {}
    intervals = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events)
    merged = []  # [start, end, name of the kernel that ended last] in us, overlaps joined
    for start, end, name in intervals:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1:] = [end, name]
        else:
            merged.append([start, end, name])
    idle = sorted(((merged[i + 1][0] - merged[i][1], merged[i][2]) for i in range(len(merged) - 1)),
                  reverse=True)
    between, inside = idle[:calls - 1], idle[calls - 1:]
    span = merged[-1][1] - merged[0][0] - sum(gap for gap, _ in between)
    busy = sum(end - start for start, end, _ in merged)
    return {"span_ms_per_call": round(span / 1e3 / calls, 3), "busy_ms_per_call": round(busy / 1e3 / calls, 3),
            "idle_ms_per_call": round((span - busy) / 1e3 / calls, 3),
            "idle_gaps_per_call": round(len(inside) / calls, 1),
            "longest_idle_us": [[round(gap, 1), name[:80]] for gap, name in inside[:gaps]]}


def hlo_op(event: dict) -> str:
    """The HLO instruction a device event ran: XLA's annotation when the trace has it (a cuBLAS kernel is named by
    the library, its custom call by the annotation), else the kernel name (fusions are named after theirs). Inside
    a CUDA graph the annotation names only the graph ("command_buffer_N"): profile with
    XLA_FLAGS=--xla_gpu_enable_command_buffer= to attribute the library kernels too."""
    op = event.get("args", {}).get("hlo_op", "")
    return event["name"] if not op or op.startswith("command_buffer") else op.replace(".", "_")


def scope(op_name: str | None) -> str:
    """Which pass and which part of the model an op belongs to, from its JAX op_name: "<pass> <part>" with pass
    forward / backward / recompute (remat) and part attn / cross_attn / mlp / block (norms, modulation, residuals)
    or "outside" (embedders, loss, optimizer). Scanned blocks run in a while loop; unrolled ones
    (`unroll_blocks`) are named by their module path alone."""
    if not op_name:
        return "unattributed"
    if "/while/" not in op_name and "/blocks/" not in op_name:
        return "outside"
    step = "recompute" if "rematted_computation" in op_name else "backward" if "transpose(" in op_name else "forward"
    part = re.search(r"blocks/(\w+)", op_name)
    part = part.group(1) if part and part.group(1) in ("attn", "cross_attn", "mlp") else "block"
    return f"{step} {part}"


def main(argv=None) -> int:
    import jax

    import timing
    import transformer as bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["forward", "train"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="JAX model config override (as benchmarks/transformer.py)")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls (after the timing warm-up)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo-dir", help="where XLA_FLAGS=--xla_dump_to wrote the HLO: name each kernel's JAX op")
    args = parser.parse_args(argv)
    case = dict(mode=args.mode, model=args.model or ("tiny" if args.tiny else "sana_600m"),
                size=args.size or (64 if args.tiny else 1024), batch=args.batch or (2 if args.tiny else 32),
                remat=args.remat, overrides=timing.parse_overrides(args.set), optimizer="came", layer_group=0,
                mesh=[-1, 1, 1], warmup=2, iters=2)
    setup = bench.jax_forward if args.mode == "forward" else bench.jax_train
    captured = {}

    def keep(fn, sync, warmup, iters):  # replaces median_ms: remember the call instead of timing it
        captured["fn"], captured["sync"] = fn, sync
        for _ in range(warmup):
            sync(fn())
        return 0.0

    bench.median_ms = keep
    setup(case)
    trace_dir = tempfile.mkdtemp(prefix="sana-profile-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.calls):
            captured["sync"](captured["fn"]())
    events = device_events(trace_dir)
    hlo = profiled_hlo(args.hlo_dir, {hlo_op(e) for e in events}) if args.hlo_dir else None
    sources = op_names(hlo) if hlo else {}
    fusion_bytes, flops = hlo_costs(hlo) if hlo else ({}, {})
    totals, counts, by_scope = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        totals[e["name"]] += e["dur"] / 1e3 / args.calls
        counts[e["name"]] += 1 / args.calls
        by_scope[scope(sources.get(hlo_op(e)))] += e["dur"] / 1e3 / args.calls
    device_ms = sum(totals.values())
    base = {"bench": "profile", **{k: case[k] for k in ("mode", "model", "size", "batch")},
            "device": jax.devices()[0].device_kind, **timing.jax_versions(jax)}
    for name, ms in totals.most_common(args.top):
        record = {**base, "kernel": name[:160], "ms": round(ms, 3), "share": round(ms / device_ms, 4),
                  "launches": round(counts[name], 1), "category": category(name)}
        if name in sources:
            record["jax_op"] = sources[name][-200:]
        if name in fusion_bytes:  # identical fusions share one kernel: the same bytes per launch
            record["gb_per_launch"] = round(fusion_bytes[name] / 1e9, 4)
            record["tb_per_s"] = round(fusion_bytes[name] * counts[name] / ms / 1e9, 2)
        print(json.dumps(record))
    by_category = collections.Counter()
    for name, ms in totals.items():
        by_category[category(name)] += ms
    summary = {**base, "summary": True, "device_ms_per_call": round(device_ms, 3),
               "kernels_per_call": round(sum(counts.values()), 1),
               **{f"{k}_ms": round(v, 3) for k, v in by_category.most_common()}, **timeline(events, args.calls)}
    gemm = gemm_flops(events, flops, args.calls)
    if gemm and by_category["matmul"]:  # the matmul category also holds cuDNN's and Triton's products
        summary["gemm_tflop"] = round(gemm / 1e12, 3)
        summary["gemm_tflops_per_s"] = round(gemm / by_category["matmul"] / 1e9, 1)
    print(json.dumps(summary))
    if sources:  # device ms per call by pass and part of the model
        print(json.dumps({**base, "by_scope": {k: round(v, 3) for k, v in by_scope.most_common()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
