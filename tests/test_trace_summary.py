"""train.trace_summary groups a trace's GPU time by kernel kind and names the eager callers."""

import gzip
import json

from train.trace_summary import main, summarize


def test_summary_of_a_small_trace(tmp_path):
    op = lambda name, ts, dur: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": 1}  # noqa: E731
    launch = lambda ts, corr: {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,  # noqa: E731
                               "args": {"correlation": corr}}
    kernel = lambda name, dur, corr: {"ph": "X", "cat": "kernel", "name": name, "ts": 1000, "dur": dur, "tid": 7,  # noqa: E731
                                      "args": {"correlation": corr}}
    events = [
        op("aten::contiguous", 10, 50), op("aten::copy_", 20, 10), launch(25, 1),
        kernel("void at::native::elementwise_kernel<128, 4>(x)", 3000, 1),
        op("autograd::engine::evaluate_function: MulBackward0", 100, 50), op("aten::mul", 110, 10), launch(115, 2),
        kernel("void at::native::elementwise_kernel<128, 4>(y)", 1000, 2),
        launch(200, 3), kernel("_slc_dkv_kernel", 5000, 3),
        launch(300, 4), kernel("nvjet_sm90_tst_192x192", 2000, 4),
        op("flexnsa::selection_attention_backward", 400, 50), launch(410, 5), kernel("_slc_dkv_kernel", 2000, 5),
    ]
    path = tmp_path / "step.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = summarize(path)
    assert "GPU time 0.013 s in 5 kernels" in text
    assert "| NSA Triton _slc_dkv_kernel | 5.0 | 1 |" in text
    assert "| NSA Triton _slc_dkv_kernel (flexnsa::selection_attention_backward) | 2.0 | 1 |" in text
    assert "| GEMM | 2.0 | 1 |" in text
    assert "| aten at::native::elementwise_kernel | 4.0 | 2 |" in text
    assert "| 3.0 | `forward | aten::contiguous > aten::copy_` |" in text
    assert "| 1.0 | `MulBackward0 | aten::mul` |" in text
    main([str(path), "--out", str(tmp_path / "s.md")])
    assert (tmp_path / "s.md").read_text().startswith("# GPU kernel time by kind and caller")


def test_timeline_finds_idle_gaps_and_exposed_communication(tmp_path):
    """Compute [0, 100), NCCL [50, 300), a 100 us gap, then a kernel launched by aten::cat
    [400, 500), a 20 us gap (below the 50 us floor), a last kernel [520, 600)."""
    op = lambda name, ts, dur: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": 1}  # noqa: E731
    launch = lambda ts, corr: {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,  # noqa: E731
                               "args": {"correlation": corr}}
    kernel = lambda name, ts, dur, corr: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7,  # noqa: E731
                                          "args": {"correlation": corr}}
    events = [
        launch(-50, 1), kernel("nvjet_sm90_a", 0, 100, 1),
        launch(-40, 2), kernel("ncclDevKernel_AllGather_RING_LL", 50, 250, 2),
        op("aten::cat", 380, 15), launch(390, 3), kernel("void at::native::CatArrayBatchedCopy<x>", 400, 100, 3),
        launch(410, 4), kernel("_cmp_fwd_kernel", 520, 80, 4),
    ]
    path = tmp_path / "step.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    text = summarize(path)
    assert "| 0.6 | 0.1 | 0.2 | 1, 0.1 |" in text  # span 600 us, idle 120, NCCL alone 220, one gap of 100
    assert "| 0.10 | 0.3 | `void at::native::CatArrayBatchedCopy<x>` | `aten::cat` |" in text
    assert "| 0.1 | 1 | `aten::cat` |" in text  # the gaps summed by what ended them
