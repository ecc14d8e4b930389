"""trace_summary: the step times, GPU busy share, kernel kinds and exposed communication read off a
Chrome trace, checked on hand-made traces whose answers are known (no GPU here to make real ones)."""

from __future__ import annotations

import pytest

from ds_train.train.trace_summary import describe, kernel_kind, summarize_trace, union_length


def _step(n: int, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{n}", "ts": ts, "dur": dur}


def _kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


@pytest.mark.parametrize(
    ("name", "cat", "kind"),
    [
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1",
            "kernel",
            "matmul",
        ),
        (
            "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>",
            "kernel",
            "matmul",
        ),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT", "kernel", "matmul"),
        ("triton_tem_fused_addmm_3", "kernel", "matmul"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "kernel", "fused"),
        ("triton_poi_fused_add_mul_silu_2", "kernel", "fused"),
        ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "kernel", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "kernel", "attention"),  # cutlass, yet attention
        (
            "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*, unsigned long, ncclWork*)",
            "kernel",
            "communication",
        ),
        (
            "void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>, float>",
            "kernel",
            "optimizer",
        ),
        ("Memcpy DtoH (Device -> Pinned)", "gpu_memcpy", "memory"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
            "kernel",
            "other",
        ),
    ],
)
def test_kernel_kinds(name, cat, kind):
    assert kernel_kind(name, cat) == kind


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_length([(3, 4), (0, 10)]) == 10


def test_breakdown_of_a_known_trace():
    # Two 50 µs steps (window 0-100). Matmul 0-30 and 20-50 (overlapping: busy 50), all-reduce 40-70
    # (10 µs under the matmul, 20 exposed), a copy 80-90, and a kernel outside the window (ignored).
    events = [
        _step(7, 0, 50),
        _step(8, 50, 50),
        # kineto's copies of the annotations on the GPU streams: not steps of their own
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#8", "ts": 60, "dur": 15},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#7", "ts": 5, "dur": 60},
        _kernel("sm90_xmma_gemm_bf16", 0, 30),
        _kernel("sm90_xmma_gemm_bf16", 20, 30),
        _kernel("ncclDevKernel_AllReduce_Sum", 40, 30),
        _kernel("Memcpy HtoD", 80, 10, cat="gpu_memcpy"),
        _kernel("sm90_xmma_gemm_bf16", 200, 50),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # host work: not a kernel
    ]
    s = summarize_trace(events)
    assert s["steps"] == [7, 8] and s["step_ms"] == [0.05, 0.05] and s["window_ms"] == 0.1
    d = s["device"]
    assert d["busy_frac"] == pytest.approx(0.8)  # 0-70 and 80-90
    assert d["kernel_ms"] == pytest.approx(0.1)  # 30 + 30 + 30 + 10 µs
    assert d["by_kind"] == pytest.approx({"matmul": 0.6, "communication": 0.3, "memory": 0.1})
    assert d["comm_exposed_frac"] == pytest.approx(0.2)
    assert d["top_kernels"][0] == {"name": "sm90_xmma_gemm_bf16", "ms": pytest.approx(0.06), "calls": 2}
    line = describe(s)
    assert line.startswith("steps 7-8: 0.1 ms/step; GPU busy 80%")
    assert "matmul 60%, communication 30%, memory 10%" in line and "exposed communication 20.0%" in line


def test_a_trace_without_kernels_or_steps():
    cpu_only = summarize_trace(
        [_step(3, 0, 2000), {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 5, "dur": 9}]
    )
    assert cpu_only["device"] is None and cpu_only["steps"] == [3]
    assert describe(cpu_only) == "step 3: 2.0 ms/step"
    assert describe(summarize_trace([])) == "no complete step was recorded"
