"""Each GPU benchmark of issue 9 runs once at a tiny size on CPU (through `sana-jax bench`), so none of them rots:
the JSON lines parse, every measurement has a positive time, and the summaries compare against the anchor."""

import json
import subprocess
import sys

import pytest


def bench(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "sana_jax.cli", "bench", *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert records, out.stderr[-3000:]
    errors = [r for r in records if "error" in r]
    assert not errors, errors
    return records


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_transformer_benchmark(mode):
    cases = ["--shapes", "64x2"] if mode == "forward" else ["--batches", "2", "--torch-batches", "2", "1"]
    records = bench("transformer", mode, "--tiny", *cases)
    measured = [r for r in records if not r.get("summary")]
    assert {r["impl"] for r in measured} == {"jax", "diffusers_eager"}
    assert all(r["ms"] > 0 and r["tflops_per_s"] >= 0 for r in measured)
    summaries = [r for r in records if r.get("summary")]
    assert summaries and all(r["speedup_vs_diffusers_eager"] > 0 for r in summaries)
    if mode == "train":  # the anchor at another batch is compared in images per second
        assert summaries[0]["throughput_vs_diffusers_eager_b1"] > 0
        assert all(0 < r["optimizer_ms"] for r in measured)  # the update alone, on both sides
        assert summaries[0]["jax_optimizer_ms"] > 0 and summaries[0]["diffusers_eager_optimizer_ms"] > 0


def test_transformer_rounds_compare_each_round_within_itself():
    """--rounds: a JAX run is compared with the anchor of its own round, then the median over the rounds."""
    from benchmarks.transformer import across_rounds, summaries

    case = {"model": "sana_1600m", "mode": "forward", "size": 1024, "batch": 32}
    records = [{**case, "impl": impl, "round": n, "ms": ms, "mfu": 0.5, "images_per_s": 32e3 / ms}
               for n, jax_ms, anchor_ms in ((1, 160.0, 200.0), (2, 170.0, 204.0), (3, 165.0, 210.0))
               for impl, ms in (("jax", jax_ms), ("diffusers_compile", anchor_ms))]
    per_round = summaries(records)
    assert [(s["round"], s["speedup_vs_diffusers_compile"]) for s in per_round] == [(1, 1.25), (2, 1.2), (3, 1.273)]
    [merged] = across_rounds(per_round)
    assert merged["rounds"] == 3 and merged["jax_ms"] == 165.0
    assert merged["speedup_vs_diffusers_compile"] == 1.25
    assert merged["speedup_vs_diffusers_compile_range"] == [1.2, 1.273]
    assert across_rounds(per_round[:1]) == []  # one round: its summary says it all
    [merged] = across_rounds(summaries(records[:1] + records[2:]))  # the anchor failed in round 1
    assert merged["rounds"] == 3 and merged["speedup_vs_diffusers_compile_range"] == [1.2, 1.273]


def test_jax_records_name_the_xla_flags_they_ran_under(monkeypatch):
    """An A/B through XLA_FLAGS (a flag can change the compiled program) is told apart in the JSON lines."""
    import jax

    from benchmarks.timing import jax_versions

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert jax_versions(jax) == {"jax": jax.__version__}
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_cublaslt=true")
    assert jax_versions(jax) == {"jax": jax.__version__, "xla_flags": "--xla_gpu_enable_cublaslt=true"}


def test_generate_benchmark():
    # 3 sampler steps, not 20: a first-order, a second-order and the lower-order final step on both sides.
    records = bench("generate", "--tiny", "--steps", "3")
    assert [r.get("impl") for r in records[:2]] == ["jax", "diffusers_eager"]
    assert all(r["image_shape"] == [2, 64, 64, 3] and r["images_per_s"] > 0 for r in records[:2])
    assert records[2]["summary"] and records[2]["speedup_vs_diffusers_eager"] > 0


def test_pallas_kernels_benchmark():
    records = bench("pallas_kernels", "--tiny")
    ops = ("glu", "glu_backward", "litela", "litela_vjp")
    assert {(r["op"], r["impl"]) for r in records} == {(op, impl) for op in ops for impl in ("xla", "pallas")}
    assert all(r["ms"] > 0 and r["rel_diff"] < 1e-2 for r in records)


def test_pallas_kernels_backward_sweep():
    """--sweep backward times each GLU backward kernel at every tile given, with its row chunk when given; --glu-shape
    runs the GLU ops only."""
    records = bench("pallas_kernels", "--tiny", "--sweep", "backward", "--glu-shape", "1", "3", "5", "24",
                    "--backward-tiles", "2,16,1", "3,32,1,2")
    swept = [r for r in records if r["op"].startswith("glu_backward_")]
    assert {(r["op"], r["tile_w"], r["block_c"], r["num_warps"], r.get("rows")) for r in swept} == {
        (f"glu_backward_{part}", *tile) for part in ("total", "input") for tile in ((2, 16, 1, None), (3, 32, 1, 2))}
    assert all(r["ms"] > 0 and r["rel_diff"] < 1e-2 for r in swept)
    assert not any(r["op"].startswith("litela") for r in records)


def test_kernel_code_counts_each_glu_kernel_loop():
    """The GLU kernels compile for sm_90 on a CPU machine; each report names its tile and finds the row loop: the
    taps of the tiny shape's 2-column tiles are FFMAs in it (the forward: 2 halves x 9 per output, of which the 6
    reading the image's border columns may fold away, as their SiLU is a known 0; part 1 also the kernel gradients;
    part 2: 9 per input channel, two channels per thread), and nothing spills."""
    records = bench("kernel_code", "--tiny")
    assert [(r["kernel"], r["tile"]) for r in records] == [
        ("silu_glu_dwconv", [2, 128, 4]), ("glu_dwconv_bwd_total", [2, 64, 2]), ("glu_dwconv_bwd_input", [2, 256, 4])]
    # elements per loop iteration and thread: 2 columns x 1 channel (128 / 4 warps, 64 / 2 warps), 2 x 2 (256 / 4)
    for record, taps, elements in zip(records, (2 * 12, 2 * 36, 2 * 2 * 9), (2, 2, 4)):
        assert record["opcodes"]["FFMA"] >= taps and record["local_bytes"] == 0, record
        assert record["per_element"] == pytest.approx(record["loop_instructions"] / elements, abs=0.005), record


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_profile_benchmark(mode):
    records = bench("profile_jax", mode, "--tiny", "--top", "3")
    assert records[-1]["summary"] and records[-1]["device_ms_per_call"] > 0
    assert len(records) == 4


def test_profile_attributes_ops_to_passes_and_parts_of_the_model():
    from benchmarks.profile_jax import hlo_op, scope

    body = "jit(step)/transpose(jvp(SanaTransformer))/while/body/eval_jaxpr/checkpoint/"
    assert scope(body + "blocks/attn/transpose(blocks)/attn/jvp()/select_n") == "backward attn"
    assert scope(body + "rematted_computation/blocks/mlp/depth_conv/silu_glu_dwconv/pallas_call") == "recompute mlp"
    assert scope(body + "blocks/add_any") == "backward block"
    assert scope("jit(step)/jvp(SanaTransformer)/while/body/eval_jaxpr/blocks/cross_attn/q_linear/dot_general") == \
        "forward cross_attn"
    unrolled = "jit(step)/transpose(jvp(SanaTransformer))/eval_jaxpr/blocks/"
    assert scope(unrolled + "add_any") == "backward block"
    assert scope(unrolled + "mlp/point_conv/dot_general") == "backward mlp"
    assert scope("jit(step)/transpose(jvp(SanaTransformer))/concatenate") == "outside"
    assert scope("jit(step)/reduce_sum") == "outside" and scope(None) == "unattributed"
    # cuBLAS kernels are attributed through XLA's annotation, except inside a CUDA graph (named after the graph)
    assert hlo_op({"name": "nvjet_sm90_tst", "args": {"hlo_op": "custom-call.13"}}) == "custom-call_13"
    assert hlo_op({"name": "loop_add_fusion_3", "args": {"hlo_op": "command_buffer_47"}}) == "loop_add_fusion_3"


def test_profile_takes_the_hlo_of_the_profiled_program(tmp_path):
    """XLA dumps every program compiled (the parameter init is larger than the 1.6B forward): the kernels are
    named from the dump that names the most of the trace's kernels, not from the largest."""
    from benchmarks.profile_jax import op_names, profiled_hlo

    init = "".join(f'  %fusion.{i} = f32[9] fusion(), metadata={{op_name="jit(init)/x{i}"}}\n' for i in range(50))
    (tmp_path / "module_1.jit_init.after_optimizations.txt").write_text(init)
    (tmp_path / "module_2.jit_step.after_optimizations.txt").write_text(
        '  %fusion.3 = f32[9] fusion(), metadata={op_name="jit(step)/blocks/add"}\n'
        '  ROOT %loop_add_fusion.1 = f32[9] fusion(), metadata={op_name="jit(step)/blocks/mul"}\n')
    sources = op_names(profiled_hlo(str(tmp_path), {"fusion_3", "loop_add_fusion_1", "nvjet_sm90"}))
    assert sources == {"fusion_3": "jit(step)/blocks/add", "loop_add_fusion_1": "jit(step)/blocks/mul"}


def test_profile_counts_fusion_bytes_and_gemm_flops(tmp_path):
    """hlo_costs reads each fusion's HBM bytes off its fused computation (operands and results) and the FLOPs of the
    cuBLAS GEMMs (2 x output x contracted size, the left operand taken through a tuple index)."""
    from benchmarks.profile_jax import hlo_costs

    dump = tmp_path / "module_2.jit_step.after_optimizations.txt"
    dump.write_text(
        "%fused_add (param_0.1: bf16[24,1024,2240], param_1.2: bf16[1,2240]) -> bf16[24,1024,2240] {\n"
        "  ROOT %add.1 = bf16[24,1024,2240]{2,1,0} add(%param_0.1, %param_1.2)\n"
        "}\n\n"
        "ENTRY %main (p.0: bf16[7,3,5], p.1: bf16[5,4]) -> bf16[3,4] {\n"
        "  %pallas_call.2 = (f32[2], bf16[3,5]{1,0}) custom-call(%p.0), custom_call_target=\"__gpu$xla.gpu.triton\"\n"
        "  %custom-call.7 = (bf16[3,4]{1,0}, s8[1024]{0}) custom-call(%pallas_call.2#1, %p.1), "
        'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
        '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}\n'
        "  %loop_add_fusion.3 = bf16[24,1024,2240]{2,1,0} fusion(%x, %y), kind=kLoop, calls=%fused_add\n"
        "}\n")
    fusions, flops = hlo_costs(str(dump))
    assert fusions == {"loop_add_fusion_3": 2 * (2 * 24 * 1024 * 2240 + 2240)}
    assert flops == {"custom-call_7": 2 * 3 * 4 * 5}


def test_profile_counts_each_execution_of_a_gemm():
    """A GEMM in the scanned blocks' while loop runs once per block: its FLOPs count once per execution in the
    trace (a split-K GEMM's reduction kernel is not a second execution); GEMMs the trace does not name count 0."""
    from benchmarks.profile_jax import gemm_flops

    def launch(kernel, op):
        return {"name": kernel, "args": {"hlo_op": op}}

    blocks, calls = 20, 2
    events = ([launch("nvjet_sm90_tst_128x160", "custom-call.7"), launch("splitKreduce", "custom-call.7")]
              * blocks * calls + [launch("nvjet_sm90_tst_256x96", "custom-call.9")] * calls)
    flops = {"custom-call_7": 1000, "custom-call_9": 10, "custom-call_11": 5}
    assert gemm_flops(events, flops, calls) == 1000 * blocks + 10
    graph = [launch("nvjet_sm90_tst_128x160", "command_buffer_3")] * calls
    assert gemm_flops(graph, flops, calls) == 0


def test_profile_timeline_splits_calls_and_counts_overlaps_once():
    """Two calls 1000 us apart: each spans 100 us, of which 70 busy (two overlapping kernels count 25 us, not 35)
    and 30 idle in two gaps; the gap between the calls is not idle time of either."""
    from benchmarks.profile_jax import timeline

    def kernel(ts, dur, name):
        return {"ts": ts, "dur": dur, "name": name}

    one_call = [kernel(0, 20, "a"), kernel(30, 20, "b"), kernel(35, 20, "c"), kernel(75, 25, "d")]
    events = one_call + [kernel(e["ts"] + 1100, e["dur"], e["name"]) for e in one_call]
    result = timeline(events[::-1], calls=2, gaps=2)
    assert result["span_ms_per_call"] == 0.1
    assert result["busy_ms_per_call"] == 0.07
    assert result["idle_ms_per_call"] == 0.03
    assert result["idle_gaps_per_call"] == 2
    assert result["longest_idle_us"] == [[20.0, "c"], [20.0, "c"]]


def test_profile_names_every_pallas_kernel_of_the_model():
    """profile_jax's "pallas" category lists exactly the `name=` of the model's, CAME's and the training step's
    pallas_calls (lowered for CUDA)."""
    import re

    import jax
    import jax.numpy as jnp

    from benchmarks.profile_jax import PALLAS_KERNELS
    from sana_jax import came_kernels, glu_conv, layer_stack, linear_attention

    glu_args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((1, 3, 5, 160), (160,), (3, 3, 160), (160,))]
    glu = lambda *a: glu_conv.silu_glu_dwconv_pallas(*a, False)  # noqa: E731
    cotangent = jnp.zeros((1, 3, 5, 80), jnp.bfloat16)
    qkv = jax.ShapeDtypeStruct((1, 70, 3 * 64), jnp.bfloat16)

    def litela(a):  # two heads of 32 channels from packed qkv columns
        return linear_attention.relu_linear_attention_pallas((a,), ((0, 0), (0, 64), (0, 128)), 2, 32, 1e-8, False)

    grad = jax.ShapeDtypeStruct((2, 40, 300), jnp.float32)
    factors = [jnp.ones((2, 40)), jnp.ones((2, 300)), jnp.ones((2,))]
    programs = [(glu, glu_args), (lambda *a: jax.vjp(glu, *a)[1](cotangent), glu_args),
                (litela, [qkv]), (lambda a: jax.vjp(litela, a)[1](jnp.zeros((1, 70, 64), jnp.bfloat16)), [qkv]),
                (came_kernels.square_sums, [grad]),
                (lambda g, m: came_kernels.confidence(g, m, *factors, 0.9, 1e-16), [grad, grad]),
                (lambda *a: layer_stack._stack_pallas(a, interpret=False), [grad] * 5)]
    names = set()
    for fn, args in programs:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        names |= set(re.findall(r'name = "([^"]+)"', text))
    assert names == set(PALLAS_KERNELS)
