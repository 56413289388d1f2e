"""Machine ceilings measured at the start of a bench: matmul GFLOP/s (fp32 numpy, bf16 torch, int8 ONNX Runtime)
and memory bandwidth (numpy copy). Each stage is then reported as a fraction of the ceiling it is bound by."""

from __future__ import annotations

import time

import numpy as np


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fp32_gflops(n: int = 1024, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def bf16_gflops(n: int = 1024, repeats: int = 5) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def int8_gops(n: int = 1024, repeats: int = 5) -> float | None:
    """uint8 x int8 -> int32 MatMulInteger in ONNX Runtime (the U8S8 path INT8 models take)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return 2 * n**3 / _best(lambda: sess.run(None, feed), repeats) / 1e9


def bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    src = np.ones(mb * (1 << 20) // 8, np.float64)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _best(lambda: np.copyto(dst, src), repeats) / 1e9


def read_bandwidth_gbs(threads: int, mb: int = 1024, repeats: int = 5) -> float:
    """Bytes read per second by `threads` threads each taking the max over its share of a float32 array (numpy
    releases the GIL in the reduction): what a decode step, which only reads its weights, can reach at best with
    the runtime's thread count. The copy above is one thread and counts a write per read; on a 2-vCPU AMD EPYC
    it gave 39.9 GB/s where this gave 46-72 GB/s and the INT4 decoder read its weights at 41-54 GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mb * (1 << 20) // 4, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        return a.nbytes / _best(lambda: list(pool.map(np.maximum.reduce, parts)), repeats) / 1e9


def measure() -> dict:
    from ..runtime.runner import default_threads

    threads = default_threads()
    return {"fp32_matmul_gflops": fp32_gflops(), "bf16_matmul_gflops": bf16_gflops(), "int8_matmul_gops": int8_gops(),
            "memory_bandwidth_gbs": bandwidth_gbs(), "read_bandwidth_gbs": read_bandwidth_gbs(threads),
            "read_bandwidth_threads": threads}
