"""The pipeline's stages in one process, no Ray: the check to run on a GPU machine.

A GPU box here has torch with CUDA, onnx and onnxruntime but no Ray and takes a small upload, so
this runs every stage function in-process and prints one JSON report:

1. ``environment``: torch, CUDA device, ONNX Runtime and its providers, transformers.
2. ``pipeline``: a tiny random Llama exported (KV cache, ONNX Runtime fusions) in float32 and
   bfloat16, verified with the PyTorch reference on the GPU (its default where CUDA is seen):
   global, per block and greedy generation, against ONNX Runtime on the saved files.
3. ``native_low_precision``: what the CPU verification of a bf16/fp16 export does not measure:
   the same checkpoint run natively in bf16/fp16 on the GPU by PyTorch, against the export run
   by ONNX Runtime as the float32-promoted graph (CPU) and, where the build has the CUDA
   provider, natively in bf16/fp16 on the GPU.
4. ``export_timing``: stage times of a larger export (plan, captures, weight shards, stitch) on
   this machine's cores, to compare with the 2-core CI machine.

    python scripts/gpu_check.py [WORK_DIR]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import torch  # noqa: E402

from shardex._capture import capture_block, capture_trunk  # noqa: E402
from shardex._generation import reference_generation, verify_saved_model  # noqa: E402
from shardex._plan import make_plan  # noqa: E402
from shardex._source import resolve_source  # noqa: E402
from shardex._stitch import stitch  # noqa: E402
from shardex._verify import (  # noqa: E402
    Step,
    compute_dtype,
    needs_promotion,
    providers,
    reference_device,
    reference_run,
    tolerances,
)
from shardex._weights import write_shard  # noqa: E402


def export_in_process(ckpt: str, out: str, *, dtype=None, runtime: str = "onnxruntime") -> tuple:
    """Plan, capture, write and stitch in this process; returns (plan, memory, model, seconds)."""
    times = {}
    clock = time.perf_counter()
    plan, memory = make_plan(
        resolve_source(ckpt),
        dtype=dtype,
        args=None,
        kwargs=None,
        dynamic_shapes=None,
        block_pattern=None,
        max_shard_size=1 << 30,
        opset=None,
        runtime=runtime,
    )
    times["plan"] = time.perf_counter() - clock
    os.makedirs(out, exist_ok=True)
    clock = time.perf_counter()
    trunk = capture_trunk(plan)
    blocks = {g.id: capture_block(plan, g.id) for g in plan.groups}
    times["capture"] = time.perf_counter() - clock
    clock = time.perf_counter()
    entries = {t.name: t for t in plan.tensors}
    for shard in plan.shards:
        write_shard(shard, [entries[n] for n in shard.tensors], out, memory)
    times["weights"] = time.perf_counter() - clock
    clock = time.perf_counter()
    model = stitch(plan, trunk, blocks, out)
    ir.save(model, os.path.join(out, "model.onnx"))
    times["stitch"] = time.perf_counter() - clock
    return plan, memory, model, {k: round(v, 2) for k, v in times.items()}


def environment() -> dict:
    import onnxruntime as ort
    import transformers

    return {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "providers_used": providers(),
        "transformers": transformers.__version__,
        "reference_device": str(reference_device()),
        "cpu_count": os.cpu_count(),
    }


def pipeline(work: str) -> dict:
    from tests.models import make_llama

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        name = str(dtype).removeprefix("torch.")
        ckpt = make_llama(os.path.join(work, f"ckpt-{name}"), layers=3, dtype=dtype)
        out = os.path.join(work, f"out-{name}")
        plan, memory, _, _ = export_in_process(ckpt, out)
        promote = needs_promotion(plan)
        atol, rtol = tolerances(compute_dtype(plan), None, None)
        inputs = plan.example.resized()
        reference = reference_run(plan, memory, inputs)
        generation_reference = reference_generation(plan, memory, 8)
        outputs, generation, blocks = verify_saved_model(
            plan,
            out,
            inputs,
            reference.outputs,
            generation_reference,
            atol,
            rtol,
            promote,
            reference.boundaries,
        )
        results[name] = {
            "passed": all(c.passed for c in outputs + blocks) and generation.passed,
            "outputs_max_abs_diff": max(c.max_abs_diff for c in outputs),
            "blocks_max_abs_diff": max(c.max_abs_diff for c in blocks),
            "generation_tokens_equal": generation.tokens_equal,
            "generation_decode_max_abs_diff": generation.decode.max_abs_diff,
            "seconds": round(time.perf_counter() - start, 1),
        }
    return results


def native_low_precision(work: str) -> dict:
    """Native bf16/fp16 (PyTorch on the GPU; ONNX Runtime's CUDA provider where present) against
    float32: the rounding the CPU verification's promotion does not measure."""
    import onnxruntime as ort
    import transformers

    from shardex._verify import SavedModelRunner
    from tests.models import make_llama

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    results = {}
    ckpt = make_llama(os.path.join(work, "ckpt-native"), layers=4, dtype=torch.float32)
    reference32 = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval().cuda()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = reference32(ids.cuda()).logits.float().cpu().numpy()
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        out = os.path.join(work, f"out-native-{name}")
        plan, _, _, _ = export_in_process(ckpt, out, dtype=dtype)
        native = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval().cuda()
        with torch.no_grad():
            torch_native = native(ids.cuda()).logits.float().cpu().numpy()
        runner = SavedModelRunner(out, promote=True)
        past = {
            n: np.zeros((2, 2, 0, 16), np.float32)
            for n in runner.input_names
            if n.startswith("past_key_values")
        }
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 16), np.int64)}
        feeds["position_ids"] = np.tile(np.arange(16), (2, 1))
        (promoted,) = runner.run_steps([Step({n: {**feeds, **past}[n] for n in runner.input_names})])
        promoted = promoted["logits"]
        entry = {
            "torch_native_vs_float32_max_abs": float(np.abs(torch_native - exact).max()),
            "onnx_promoted_vs_float32_max_abs": float(np.abs(promoted - exact).max()),
            "onnx_promoted_vs_torch_native_max_abs": float(np.abs(promoted - torch_native).max()),
        }
        if "CUDAExecutionProvider" in ort.get_available_providers():
            sess = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CUDAExecutionProvider"])
            native_past = {
                n: np.zeros((2, 2, 0, 16), np.float16 if dtype == torch.float16 else np.float32) for n in past
            }
            try:
                onnx_native = sess.run(None, {**feeds, **native_past})[0].astype(np.float32)
                entry["onnx_cuda_native_vs_torch_native_max_abs"] = float(
                    np.abs(onnx_native - torch_native).max()
                )
            except Exception as e:  # record what the provider refuses
                entry["onnx_cuda_native_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            entry["onnx_cuda_native"] = "not run: this onnxruntime build has no CUDA provider"
        results[name] = entry
    return results


def export_timing(work: str) -> dict:
    """A ~1B-parameter bf16 Llama-shaped checkpoint, exported in-process (no Ray)."""
    import subprocess

    ckpt = os.path.join(work, "ckpt-1b")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "make_checkpoint.py"),
            ckpt,
            "--hidden",
            "2048",
            "--layers",
            "16",
            "--heads",
            "16",
            "--kv-heads",
            "8",
            "--dtype",
            "bfloat16",
        ],
        check=True,
        capture_output=True,
    )
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    start = time.perf_counter()
    plan, _, _, times = export_in_process(ckpt, os.path.join(work, "out-1b"))
    return {
        "checkpoint_gb": round(size / 1e9, 2),
        "parameters": sum(int(np.prod(t.shape)) for t in plan.tensors if not t.is_buffer),
        "stages_s": times,
        "total_s": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="shardex-gpu-")
    report = {"environment": environment()}
    checks = {
        "pipeline": pipeline,
        "native_low_precision": native_low_precision,
        "export_timing": export_timing,
    }
    only = os.environ.get("SHARDEX_GPU_CHECKS")  # e.g. "pipeline" to run part of it
    for name, check in checks.items():
        if only and name not in only.split(","):
            continue
        start = time.perf_counter()
        try:
            report[name] = check(work)
        except Exception as e:  # a report of what failed beats no report
            report[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        report[name + "_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: report[name]}, default=str), flush=True)
    print(json.dumps(report, indent=2, default=str))
    passed = all(v.get("passed") for v in report.get("pipeline", {}).values() if isinstance(v, dict))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
