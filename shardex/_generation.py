"""Verification of generation: greedy decoding through the KV cache, ONNX Runtime against PyTorch.

The logits checks of `_verify` compare one step. A generation export is used for many: a prompt
with an empty past, then one token at a time with the presents fed back as the past. This check
runs that loop on both sides, on a batch of two prompts (the second left-padded):

1. PyTorch (the streamed reference: memory stays ~ trunk + one block) decodes greedily and
   records its tokens and each step's last-position logits;
2. ONNX Runtime runs the same steps *fed PyTorch's tokens* and records its own argmax and logits
   at each step.

Fed the same prefix, both sides choosing the same token at every step is exactly "ONNX Runtime's
greedy decoding produces PyTorch's tokens", and the logits stay comparable at every step even
where the two would diverge. The prefill's logits are compared at every real (unpadded) position,
each decode step's at its one position.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from shardex._output import MODEL_FILE
from shardex._plan import ExampleInputs, Plan
from shardex._state_cache import next_state, present_name, zero_state, zero_state_feeds
from shardex._verify import (
    CheckResult,
    SavedModelRunner,
    Step,
    StreamedReference,
    _to_numpy,
    block_checks,
    compare,
    global_checks,
    global_step,
    release_freed_memory,
    runtime_failure,
)

logger = logging.getLogger("shardex")

LEFT_PADDING = 3  # padding tokens before the second prompt


@dataclasses.dataclass
class GenerationCheck:
    """Greedy decoding of `new_tokens` tokens: PyTorch's tokens, ONNX Runtime's choice at each
    step (fed PyTorch's prefix), and the logits of the prefill and of the worst decode step."""

    new_tokens: int
    torch_tokens: list[list[int]]
    onnx_tokens: list[list[int]]
    prefill: CheckResult
    decode: CheckResult

    @property
    def tokens_equal(self) -> bool:
        return self.torch_tokens == self.onnx_tokens

    @property
    def passed(self) -> bool:
        return self.tokens_equal and self.prefill.passed and self.decode.passed

    def checks(self) -> list[CheckResult]:
        tokens = CheckResult(
            f"generation: greedy tokens ({self.new_tokens} new)",
            0.0 if self.tokens_equal else float("inf"),
            0.0 if self.tokens_equal else float("inf"),
            0.0,
            0.0,
            self.tokens_equal,
        )
        return [tokens, self.prefill, self.decode]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"tokens_equal": self.tokens_equal, "passed": self.passed}


@dataclasses.dataclass
class GenerationReference:
    """What PyTorch did: the prompt, its greedy tokens and each step's logits."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    tokens: np.ndarray  # [batch, new_tokens]
    prefill_logits: np.ndarray  # [batch, prompt, vocab]
    step_logits: list[np.ndarray]  # per decode step: [batch, vocab]


def generation_prompt(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts from the example's token ids, the second left-padded."""
    ids = plan.example.kwargs["input_ids"][:2].numpy().copy()
    mask = np.ones_like(ids)
    mask[-1, :LEFT_PADDING] = 0
    return ids, mask


def _positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers derives them from a left-padded mask (pads at 1)."""
    positions = np.cumsum(attention_mask, -1) - 1
    positions[attention_mask == 0] = 1
    return positions.astype(np.int64)


def _empty_past(plan: Plan, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each cache layer's key and value shape with a past of length 0."""
    example = plan.example.kwargs.get("past_key_values", ())  # none: a state-space model's state
    return [
        tuple((batch, *layer[kind].shape[1:2], 0, *layer[kind].shape[3:]) for kind in ("key", "value"))
        for layer in example
    ]


def reference_generation(
    plan: Plan, memory: dict[str, torch.Tensor], new_tokens: int, *, threads: int | None = 1
) -> GenerationReference:
    """PyTorch's greedy decoding of `new_tokens` tokens, weights streamed block by block, on
    `threads` CPU threads (None: PyTorch's default, when nothing else runs beside it)."""
    reference = StreamedReference(plan, memory, record=False, threads=threads)
    ids, mask = generation_prompt(plan)
    past = tuple(
        {
            "key": torch.zeros(key, dtype=reference.compute),
            "value": torch.zeros(value, dtype=reference.compute),
        }
        for key, value in _empty_past(plan, ids.shape[0])
    )
    state = zero_state(plan.example.kwargs, ids.shape[0], lambda t: t.to(reference.compute))
    step_ids, step_mask = ids, mask
    tokens, step_logits, prefill_logits = [], [], None
    for step in range(new_tokens):
        kwargs = {
            "input_ids": torch.from_numpy(step_ids),
            "attention_mask": torch.from_numpy(step_mask),
            "position_ids": torch.from_numpy(_positions(step_mask)[:, -step_ids.shape[1] :]),
            "past_key_values": past,
        }
        if state is not None:  # a state-space model: its recurrent state instead of keys and values
            del kwargs["past_key_values"]
            kwargs |= state
        if "position_ids" not in plan.input_names:
            del kwargs["position_ids"]
        output = reference((), kwargs)
        logits = _to_numpy(output["logits"])
        if step == 0:
            prefill_logits = logits
        else:
            step_logits.append(logits[:, -1])
        next_token = logits[:, -1].argmax(-1)
        tokens.append(next_token)
        past, state = output.get("present"), next_state(output)
        step_ids = next_token[:, None].astype(np.int64)
        step_mask = np.concatenate([step_mask, np.ones((step_mask.shape[0], 1), np.int64)], axis=1)
    del output, past, state  # the last step's cache
    release_freed_memory()
    return GenerationReference(ids, mask, np.stack(tokens, axis=1), prefill_logits, step_logits)


def generation_steps(plan: Plan, reference: GenerationReference, promote: bool) -> list[Step]:
    """ONNX Runtime's steps, fed PyTorch's tokens: the prompt with an empty past, then each of
    PyTorch's tokens with the previous step's presents as the past. All known in advance, so
    every step runs in one pass over the weights (`SavedModelRunner.run_steps`)."""
    example = {name: _to_numpy(t) for name, t in zip(plan.input_names, plan.example.flat_tensors())}
    batch = reference.input_ids.shape[0]
    past = zero_state_feeds(plan.example.kwargs, batch, np.float32 if promote else None)
    for i, shapes in enumerate(_empty_past(plan, batch)):
        for kind, shape in zip(("key", "value"), shapes):
            name = f"past_key_values.{i}.{kind}"
            past[name] = np.zeros(shape, np.float32 if promote else example[name].dtype)
    carried = {name: present_name(name) for name in past}
    step_ids, step_mask = reference.input_ids, reference.attention_mask
    steps = []
    for step in range(reference.tokens.shape[1]):
        feeds = {
            "input_ids": step_ids,
            "attention_mask": step_mask,
            "position_ids": _positions(step_mask)[:, -step_ids.shape[1] :],
        }
        feeds = {n: v for n, v in feeds.items() if n in plan.input_names}
        steps.append(Step(feeds | past, {}, ["logits"]) if step == 0 else Step(feeds, carried, ["logits"]))
        step_ids = reference.tokens[:, step : step + 1].astype(np.int64)  # PyTorch's token, for both
        step_mask = np.concatenate([step_mask, np.ones((batch, 1), np.int64)], axis=1)
    return steps


def generation_check(
    reference: GenerationReference, logits: list[np.ndarray], atol: float, rtol: float
) -> GenerationCheck:
    """ONNX Runtime's greedy choice and logits at each step (`logits`, fed PyTorch's prefix)
    against PyTorch's tokens and logits."""
    real = reference.attention_mask.astype(bool)
    prefill = compare(
        "generation: prefill logits", logits[0][real], reference.prefill_logits[real], atol, rtol
    )
    decode_checks = [
        compare(f"generation: decode step {step} logits", step_logits[:, -1], expected, atol, rtol)
        for step, (step_logits, expected) in enumerate(zip(logits[1:], reference.step_logits), start=1)
    ]
    worst = max(decode_checks, key=lambda c: (not c.passed, c.max_abs_diff), default=None)
    check = GenerationCheck(
        new_tokens=reference.tokens.shape[1],
        torch_tokens=reference.tokens.tolist(),
        onnx_tokens=np.stack([step_logits[:, -1].argmax(-1) for step_logits in logits], axis=1).tolist(),
        prefill=prefill,
        decode=worst or dataclasses.replace(prefill, name="generation: decode steps (none)"),
    )
    logger.info(
        "verify generation: %d tokens %s; prefill max abs diff %.3g, decode %.3g",
        check.new_tokens,
        "equal" if check.tokens_equal else "DIFFER",
        check.prefill.max_abs_diff,
        check.decode.max_abs_diff,
    )
    return check


def failed_generation(reference: GenerationReference, failure: CheckResult) -> GenerationCheck:
    """The generation check when ONNX Runtime could not run the steps at all."""
    return GenerationCheck(reference.tokens.shape[1], reference.tokens.tolist(), [], failure, failure)


def verify_saved_model(
    plan: Plan,
    output_dir: str,
    inputs: ExampleInputs,
    reference_outputs: list[np.ndarray],
    generation: GenerationReference,
    atol: float,
    rtol: float,
    promote: bool,
    boundaries: dict | None = None,
) -> tuple[list[CheckResult], GenerationCheck, list[CheckResult]]:
    """The global check, the greedy-decoding check of a generation export and the checks of
    the blocks in `boundaries` (path -> recorded PyTorch inputs and outputs) in one pass over
    ``model.onnx``'s weights: each session (the file, or each segment) is opened once for the
    global step, every decoding step and, for a block's segment, its block check."""
    boundaries = boundaries or {}
    runner = SavedModelRunner(output_dir, promote, model_file=plan.model_file, block_paths=list(boundaries))
    steps = [global_step(runner, inputs, promote), *generation_steps(plan, generation, promote)]
    try:
        (global_outputs, *step_outputs), blocks = runner.run(steps, boundaries)
    except Exception as e:  # ONNX Runtime's errors are plain Exceptions
        failure = runtime_failure(f"{MODEL_FILE} in {output_dir}", e, atol, rtol)
        return [failure], failed_generation(generation, failure), []
    checks = global_checks(runner, global_outputs, reference_outputs, atol, rtol)
    generated = generation_check(generation, [o["logits"] for o in step_outputs], atol, rtol)
    return checks, generated, block_checks(blocks, boundaries, atol, rtol)


# --- encoder-decoders ----------------------------------------------------------------------


def verify_seq2seq_generation(
    plans: dict[str, Plan],
    memory: dict[str, torch.Tensor],
    output_dir: str,
    new_tokens: int,
    atol: float,
    rtol: float,
    promote: bool,
) -> GenerationCheck:
    """Greedy decoding through an encoder-decoder's three files, end to end: the encoder, the
    decoder's first step (from the decoder start token, computing the cross-attention cache),
    then ``decoder_with_past`` once per token. PyTorch runs the same three programs streamed;
    ONNX Runtime runs the saved files, the decoders on ONNX Runtime's own encoder output, fed
    PyTorch's tokens (as for decoder-only models: equal choices at every step)."""
    encoder_inputs = _encoder_prompt(plans["encoder"])
    start = np.full(
        (next(iter(encoder_inputs.values())).shape[0], 1), _decoder_start(plans["decoder"]), np.int64
    )
    mask = encoder_inputs.get("attention_mask")
    cross_mask = {} if mask is None else {"encoder_attention_mask": mask}
    reference = _seq2seq_reference(plans, memory, encoder_inputs, start, cross_mask, new_tokens)

    def runner(component: str) -> SavedModelRunner:
        return SavedModelRunner(output_dir, promote, model_file=plans[component].model_file)

    try:
        (encoded,) = runner("encoder").run_steps([Step(encoder_inputs, {}, ["last_hidden_state"])])
        context = cross_mask | {"encoder_hidden_states": encoded["last_hidden_state"]}
        (first,) = runner("decoder").run_steps([Step({"input_ids": start} | context)])
        cross = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in first.items()
            if name.startswith("present.")
        }
        own = {name: present_name(name) for name in cross if ".decoder." in name}
        steps = [
            Step(
                {"input_ids": reference.tokens[:, step - 1 : step]}
                | context
                | {n: v for n, v in cross.items() if step == 1 or ".encoder." in n},
                {} if step == 1 else own,
                ["logits"],
            )
            for step in range(1, reference.tokens.shape[1])
        ]
        later = runner("decoder_with_past").run_steps(steps) if steps else []
    except Exception as e:  # ONNX Runtime's errors are plain Exceptions
        return failed_generation(reference, runtime_failure(f"the decoders in {output_dir}", e, atol, rtol))
    return generation_check(reference, [first["logits"], *(o["logits"] for o in later)], atol, rtol)


def _encoder_prompt(plan: Plan) -> dict[str, np.ndarray]:
    """The encoder's inputs: two token prompts from the example, the second one padded (at
    its start, as for decoders); or the example's speech features."""
    if "input_ids" not in plan.input_names:
        return {name: _to_numpy(t)[:2] for name, t in zip(plan.input_names, plan.example.flat_tensors())}
    ids, mask = generation_prompt(plan)
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_start(plan: Plan) -> int:
    from shardex._source import hf_config

    config = hf_config(plan.source)
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 0


def _seq2seq_reference(plans, memory, encoder_inputs, start, cross_mask, new_tokens) -> GenerationReference:
    """PyTorch's greedy decoding through the three programs, weights streamed block by block."""
    run = {c: StreamedReference(p, memory, record=False) for c, p in plans.items()}
    tensors = {k: torch.from_numpy(v) for k, v in encoder_inputs.items()}
    hidden = run["encoder"]((), tensors)["last_hidden_state"]
    context = {k: torch.from_numpy(v) for k, v in cross_mask.items()} | {"encoder_hidden_states": hidden}
    output = run["decoder"]((), {"input_ids": torch.from_numpy(start)} | context)
    cross = [layer["encoder"] for layer in output["present"]]
    logits = _to_numpy(output["logits"])
    prefill, step_logits, tokens = logits, [], [logits[:, -1].argmax(-1)]
    for _ in range(new_tokens - 1):
        past = tuple({"decoder": own["decoder"], "encoder": c} for own, c in zip(output["present"], cross))
        ids = torch.from_numpy(tokens[-1][:, None].astype(np.int64))
        output = run["decoder_with_past"]((), {"input_ids": ids} | context | {"past_key_values": past})
        logits = _to_numpy(output["logits"])
        step_logits.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1))
    ones = np.ones_like(start)
    return GenerationReference(start, ones, np.stack(tokens, axis=1), prefill, step_logits)
