"""The pipeline's stages in one process, no Ray: the check to run on a GPU machine.

A GPU box here has torch with CUDA, onnx and onnxruntime but no Ray, and takes a small upload,
so this runs every stage function in-process on a tiny random Llama, then reports which device
the PyTorch reference and which provider ONNX Runtime used, and the verification numbers.

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

import onnx_ir as ir  # noqa: E402
import torch  # noqa: E402

from shardex._capture import capture_block, capture_trunk  # noqa: E402
from shardex._plan import make_plan  # noqa: E402
from shardex._source import resolve_source  # noqa: E402
from shardex._stitch import stitch  # noqa: E402
from shardex._verify import (  # noqa: E402
    block_check_model,
    compute_dtype,
    needs_promotion,
    providers,
    reference_device,
    reference_run,
    tolerances,
    verify_block_group,
    verify_global,
)
from shardex._weights import write_shard  # noqa: E402


def main() -> int:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="shardex-gpu-")
    from tests.models import make_llama

    results = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "providers": providers()}
    results["reference_device"] = str(reference_device())
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        name = str(dtype).removeprefix("torch.")
        ckpt = make_llama(os.path.join(work, f"ckpt-{name}"), layers=3, dtype=dtype)
        out = os.path.join(work, f"out-{name}")
        os.makedirs(out, exist_ok=True)
        plan, memory = make_plan(
            resolve_source(ckpt),
            dtype=None,
            args=None,
            kwargs=None,
            dynamic_shapes=None,
            block_pattern=None,
            max_shard_size=1 << 20,
            opset=None,
        )
        entries = {t.name: t for t in plan.tensors}
        for shard in plan.shards:
            write_shard(shard, [entries[n] for n in shard.tensors], out, memory)
        model = stitch(plan, capture_trunk(plan), {g.id: capture_block(plan, g.id) for g in plan.groups}, out)
        ir.save(model, os.path.join(out, "model.onnx"))
        promote = needs_promotion(plan)
        atol, rtol = tolerances(compute_dtype(plan), None, None)
        inputs = plan.example.resized()
        reference = reference_run(plan, memory, inputs)
        checks = {g.function_name: block_check_model(model, plan, g, promote) for g in plan.groups}
        outputs = verify_global(plan, out, inputs, reference.outputs, atol, rtol, promote)
        blocks = [
            c
            for g in plan.groups
            for c in verify_block_group(
                checks[g.function_name], plan, g, reference.boundaries, out, atol, rtol
            )
        ]
        results[name] = {
            "passed": all(c.passed for c in outputs + blocks),
            "outputs_max_abs_diff": max(c.max_abs_diff for c in outputs),
            "blocks_max_abs_diff": max(c.max_abs_diff for c in blocks),
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(results, indent=2))
    return 0 if all(results[k]["passed"] for k in ("float32", "bfloat16")) else 1


if __name__ == "__main__":
    sys.exit(main())
