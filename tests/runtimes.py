"""Generation runtimes for tests: onnxruntime-genai and Optimum, each run in its own environment.

Those environments live under `.venv-runtimes/` (created by scripts/setup_runtimes.sh, which
scripts/setup.sh calls) because onnxruntime-genai needs the CPU `onnxruntime` package, which
would overwrite `onnxruntime-gpu` in the main environment, and Optimum needs transformers 4.
A test marked `requires_runtime("genai")` skips, saying so, when its environment is missing.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.runtime_runner import hf_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIMES = os.path.join(ROOT, ".venv-runtimes")
RUNNER = os.path.join(ROOT, "tests", "runtime_runner.py")


def runtime_python(name: str) -> str | None:
    """The python of environment `name` ("genai", "optimum"), or None when it is not set up."""
    path = os.path.join(RUNTIMES, name, "bin", "python")
    return path if os.path.isfile(os.path.join(RUNTIMES, name, ".requirements")) else None


def requires_runtime(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        runtime_python(name) is None,
        reason=f"{RUNTIMES}/{name} is not set up: run `bash scripts/setup_runtimes.sh`",
    )


def builder_command(
    checkpoint: str, output_dir: str, *, precision: str = "fp32", ep: str = "cpu"
) -> list[str]:
    """The onnxruntime-genai model builder as users run it, in the genai environment."""
    python = runtime_python("genai")
    assert python, f"Bug: {RUNTIMES}/genai is not set up (guard the caller with requires_runtime)"
    return [
        python,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        checkpoint,
        "-o",
        output_dir,
        "-p",
        precision,
        "-e",
        ep,
    ]


def run_builder(checkpoint, output_dir, **options) -> str:
    command = builder_command(os.fspath(checkpoint), os.fspath(output_dir), **options)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"builder failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return os.fspath(output_dir)


def run_in_runtime(name: str, command: str, **request):
    """Run one runner command in environment `name`; returns its result, raises with its stderr."""
    done = subprocess.run(
        [runtime_python(name), RUNNER],
        input=json.dumps({"command": command, **request}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} {command} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["result"]


def genai_greedy(model_dir, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens per prompt from onnxruntime_genai.Model / Generator (cut after eos)."""
    return _greedy("genai", model_dir, prompt_ids, max_new_tokens)


def optimum_greedy(model_dir, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens per prompt from Optimum's ORTModelForCausalLM.generate (cut after eos)."""
    return _greedy("optimum", model_dir, prompt_ids, max_new_tokens)


def _greedy(runtime: str, model_dir, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    request = dict(model_dir=os.fspath(model_dir), prompts=prompt_ids, max_new_tokens=max_new_tokens)
    return run_in_runtime(runtime, f"{runtime}_greedy", **request)


def genai_encode(model_dir, text: str) -> list[int]:
    """Token ids of `text` from onnxruntime_genai.Tokenizer (reads the directory's tokenizer files)."""
    return run_in_runtime("genai", "genai_encode", model_dir=os.fspath(model_dir), text=text)


def torch_greedy(checkpoint, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference: transformers' `generate(do_sample=False)` on the checkpoint, left-padded
    like the runtimes, new tokens cut after eos."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(checkpoint)).eval()
    return hf_greedy(model, prompt_ids, max_new_tokens)
