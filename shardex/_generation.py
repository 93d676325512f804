"""Verification of generation: decoding through the KV cache, ONNX Runtime against PyTorch.

A generation export is run many times per answer: a prompt with an empty past, then new tokens
with the presents fed back as the past. This check runs that loop in ONNX Runtime and compares
it with PyTorch's one pass over the same whole sequence (teacher forcing), on a batch of three
prompts at other sizes than the capture's (the last left-padded):

1. PyTorch (the streamed reference: memory stays ~ trunk + one block) runs the prompt followed
   by `new_tokens - 1` fed tokens at once, with an empty past, and records every position's
   logits, its cache after the last token and each block's inputs and outputs;
2. ONNX Runtime runs the same sequence in three steps through its cache: the prompt (empty
   past), one token (the single-token decode runtimes repeat), then the other fed tokens at once
   (a multi-token step with a past, as in chunked prefill), each step's past the presents of
   the step before.

Causal attention makes the two the same computation, so ONNX Runtime's logits at every real
position, its next-token choice at each of the `new_tokens` positions and its final cache must
match PyTorch's. Same choices at every position fed the same prefix is "ONNX Runtime's decoding
through the cache picks PyTorch's tokens", and the logits stay comparable even where the two would
diverge. One PyTorch pass and three ONNX Runtime steps cover what eight greedy steps on each side
did (DESIGN.md, Verify: at 6.7B bf16 those were 9 passes over 13.4 GB of weights on each side).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from shardex._output import MODEL_FILE
from shardex._plan import ExampleInputs, Plan
from shardex._state_cache import present_name, zero_state, zero_state_feeds
from shardex._verify import (
    CheckResult,
    SavedModelRunner,
    Step,
    StreamedReference,
    _flat_numpy,
    _to_numpy,
    at_real_positions,
    block_checks,
    chained_block_check,
    compare,
    release_freed_memory,
    runtime_failure,
)

logger = logging.getLogger("shardex")

LEFT_PADDING = 3  # padding tokens before the last prompt


@dataclasses.dataclass
class GenerationCheck:
    """`new_tokens` next-token choices through the cache, fed the same tokens on both sides:
    PyTorch's and ONNX Runtime's at each position, and the logits of the prompt and of the
    decoding steps."""

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
            f"generation: next-token choices ({self.new_tokens} positions)",
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
    """PyTorch's one pass over a prompt and the tokens fed after it: the whole sequence's ids
    and mask, how many of its positions are the prompt, the pass's outputs by name (logits at
    every position; the cache after the last token) and its block boundaries."""

    input_ids: np.ndarray  # [batch, prompt + fed tokens]
    attention_mask: np.ndarray
    prompt: int
    outputs: dict[str, np.ndarray]
    boundaries: dict = dataclasses.field(default_factory=dict)
    input_shapes: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def logits(self) -> np.ndarray:
        return self.outputs["logits"]

    @property
    def new_tokens(self) -> int:
        return self.input_ids.shape[1] - self.prompt + 1

    def step_spans(self) -> list[tuple[int, int]]:
        """The positions each ONNX Runtime step runs: the prompt, then one token, then the rest
        at once."""
        total = self.input_ids.shape[1]
        cuts = [0, self.prompt, min(self.prompt + 1, total), total]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _fed_tokens(ids: np.ndarray, count: int) -> np.ndarray:
    """`count` tokens to feed after the prompt `ids`: its own ids backwards, repeated (valid
    token ids, different from row to row)."""
    backwards = ids[:, ::-1]
    return np.tile(backwards, (1, -(-count // backwards.shape[1])))[:, :count].astype(np.int64)


def _left_padded_mask(ids: np.ndarray) -> np.ndarray:
    """The attention mask of `ids` with the last row's first `LEFT_PADDING` tokens as padding."""
    mask = np.ones_like(ids)
    mask[-1, :LEFT_PADDING] = 0
    return mask


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
    plan: Plan,
    memory: dict[str, torch.Tensor],
    inputs: ExampleInputs,
    new_tokens: int,
) -> GenerationReference:
    """PyTorch's pass over the verification inputs' token ids (the last row left-padded) and
    `new_tokens - 1` tokens fed after them, with an empty past, weights streamed block by
    block."""
    prompt_ids = _to_numpy(inputs.kwargs["input_ids"]).astype(np.int64)
    ids = np.concatenate([prompt_ids, _fed_tokens(prompt_ids, new_tokens - 1)], axis=1)
    mask = _left_padded_mask(ids)
    reference = StreamedReference(plan, memory)
    compute = reference.compute
    kwargs = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(_positions(mask)),
        "past_key_values": tuple(
            {
                "key": torch.zeros(key, dtype=compute),
                "value": torch.zeros(value, dtype=compute),
            }
            for key, value in _empty_past(plan, ids.shape[0])
        ),
    }
    state = zero_state(plan.example.kwargs, ids.shape[0], lambda t: t.to(compute))
    if state is not None:  # a state-space model: its recurrent state instead of keys and values
        del kwargs["past_key_values"]
        kwargs |= state
    if "position_ids" not in plan.input_names:
        del kwargs["position_ids"]
    output = reference((), kwargs)
    outputs = dict(zip(plan.output_names, _flat_numpy(output), strict=True))
    shapes = [list(t.shape) for t in ExampleInputs((), kwargs, []).flat_tensors()]
    generation = GenerationReference(ids, mask, prompt_ids.shape[1], outputs, reference.boundaries, shapes)
    del output, reference
    release_freed_memory()
    return generation


def generation_steps(plan: Plan, reference: GenerationReference, promote: bool) -> list[Step]:
    """ONNX Runtime's steps over PyTorch's sequence (`GenerationReference.step_spans`): the
    prompt with an empty past, then the fed tokens with the previous step's presents as the
    past. All known in advance, so every step runs in one pass over the weights
    (`SavedModelRunner.run`); the last step returns every output (its presents are compared)."""
    example = {name: _to_numpy(t) for name, t in zip(plan.input_names, plan.example.flat_tensors())}
    batch = reference.input_ids.shape[0]
    past = zero_state_feeds(plan.example.kwargs, batch, np.float32 if promote else None)
    for i, shapes in enumerate(_empty_past(plan, batch)):
        for kind, shape in zip(("key", "value"), shapes):
            name = f"past_key_values.{i}.{kind}"
            past[name] = np.zeros(shape, np.float32 if promote else example[name].dtype)
    carried = {name: present_name(name) for name in past}
    positions = _positions(reference.attention_mask)
    spans = reference.step_spans()
    steps = []
    for index, (start, stop) in enumerate(spans):
        feeds = {
            "input_ids": reference.input_ids[:, start:stop],
            "attention_mask": reference.attention_mask[:, :stop],
            "position_ids": positions[:, start:stop],
        }
        feeds = {n: v for n, v in feeds.items() if n in plan.input_names}
        wanted = None if index == len(spans) - 1 else ["logits"]
        steps.append(Step(feeds | past, {}, wanted) if index == 0 else Step(feeds, carried, wanted))
    return steps


def generation_check(
    reference: GenerationReference, logits: np.ndarray, atol: float, rtol: float
) -> GenerationCheck:
    """ONNX Runtime's logits of every step (concatenated, the whole sequence) against PyTorch's
    one pass: at the prompt's real positions, at the fed positions, and the next-token choice at
    each of the `new_tokens` positions (the prompt's last and every fed token's)."""
    prompt, expected = reference.prompt, reference.logits
    if logits.shape != expected.shape:
        return failed_generation(reference, compare("generation: logits", logits, expected, atol, rtol))
    in_prompt = at_real_positions(
        logits[:, :prompt], expected[:, :prompt], reference.attention_mask[:, :prompt]
    )
    prefill = compare("generation: prompt logits", *in_prompt, atol, rtol)
    decode = compare(
        f"generation: decode logits ({expected.shape[1] - prompt} positions through the cache)",
        logits[:, prompt:],
        expected[:, prompt:],
        atol,
        rtol,
    )
    check = GenerationCheck(
        new_tokens=reference.new_tokens,
        torch_tokens=expected[:, prompt - 1 :].argmax(-1).tolist(),
        onnx_tokens=logits[:, prompt - 1 :].argmax(-1).tolist(),
        prefill=prefill,
        decode=decode,
    )
    logger.info(
        "verify generation: %d next-token choices %s; prompt max abs diff %.3g, decode %.3g",
        check.new_tokens,
        "equal" if check.tokens_equal else "DIFFER",
        check.prefill.max_abs_diff,
        check.decode.max_abs_diff,
    )
    return check


def failed_generation(reference: GenerationReference, failure: CheckResult) -> GenerationCheck:
    """The generation check when ONNX Runtime could not run the steps at all."""
    tokens = reference.logits[:, reference.prompt - 1 :].argmax(-1).tolist()
    return GenerationCheck(reference.new_tokens, tokens, [], failure, failure)


def verify_saved_model(
    plan: Plan,
    output_dir: str,
    reference: GenerationReference,
    atol: float,
    rtol: float,
    promote: bool,
    boundaries: dict | None = None,
) -> tuple[list[CheckResult], GenerationCheck, list[CheckResult]]:
    """A generation export's global, generation and block checks in one pass over
    ``model.onnx``'s weights: each session (the file, or each segment) is opened once for every
    step and, for a block's segment, its block check (`boundaries`: path -> recorded PyTorch
    inputs and outputs). The output checks are the whole sequence's logits (real positions)
    and the cache after the last step, against PyTorch's one pass."""
    boundaries = boundaries or {}
    runner = SavedModelRunner(output_dir, promote, model_file=plan.model_file, block_paths=list(boundaries))
    try:
        chained = chained_block_check(boundaries, atol, rtol, reference.attention_mask)
        step_outputs, blocks = runner.run(generation_steps(plan, reference, promote), boundaries, chained)
    except Exception as e:  # ONNX Runtime's errors are plain Exceptions
        failure = runtime_failure(f"{MODEL_FILE} in {output_dir}", e, atol, rtol)
        return [failure], failed_generation(reference, failure), []
    logits = np.concatenate([o["logits"] for o in step_outputs], axis=1)
    final = step_outputs[-1] | {"logits": logits}
    checks = []
    for name in runner.output_names:
        expected = reference.outputs.get(name)
        if expected is None:
            checks.append(
                CheckResult(f"output:{name} (PyTorch has none)", math.inf, math.inf, atol, rtol, False)
            )
            continue
        actual, expected = at_real_positions(final[name], expected, reference.attention_mask)
        checks.append(compare(f"output:{name}", actual, expected, atol, rtol))
    generated = generation_check(reference, logits, atol, rtol)
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
    """Decoding through an encoder-decoder's three files, end to end, against PyTorch's one
    pass: the encoder, then the decoder over the start token and `new_tokens - 1` fed tokens.
    ONNX Runtime runs the saved files, the decoders on ONNX Runtime's own encoder output: the
    decoder's first step (the start token; it computes the cross-attention cache), then
    ``decoder_with_past`` for one token and for the others at once (as for decoder-only
    models: the same next-token choice and logits at every position)."""
    encoder_inputs = _encoder_prompt(plans["encoder"])
    start = np.full(
        (next(iter(encoder_inputs.values())).shape[0], 1), _decoder_start(plans["decoder"]), np.int64
    )
    mask = encoder_inputs.get("attention_mask")
    cross_mask = {} if mask is None else {"encoder_attention_mask": mask}
    reference = _seq2seq_reference(plans, memory, encoder_inputs, start, cross_mask, new_tokens)

    def runner(component: str) -> SavedModelRunner:
        return SavedModelRunner(output_dir, promote, model_file=plans[component].model_file)

    ids = reference.input_ids
    try:
        (encoded,) = runner("encoder").run_steps([Step(encoder_inputs, {}, ["last_hidden_state"])])
        context = cross_mask | {"encoder_hidden_states": encoded["last_hidden_state"]}
        (first,) = runner("decoder").run_steps([Step({"input_ids": ids[:, :1]} | context)])
        cross = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in first.items()
            if name.startswith("present.")
        }
        own = {name: present_name(name) for name in cross if ".decoder." in name}
        steps = [
            Step(
                {"input_ids": ids[:, a:b]}
                | context
                | {n: v for n, v in cross.items() if i == 0 or ".encoder." in n},
                {} if i == 0 else own,
                ["logits"],
            )
            for i, (a, b) in enumerate(reference.step_spans()[1:])
        ]
        later = runner("decoder_with_past").run_steps(steps) if steps else []
    except Exception as e:  # ONNX Runtime's errors are plain Exceptions
        return failed_generation(reference, runtime_failure(f"the decoders in {output_dir}", e, atol, rtol))
    logits = np.concatenate([first["logits"], *(o["logits"] for o in later)], axis=1)
    return generation_check(reference, logits, atol, rtol)


def _encoder_prompt(plan: Plan) -> dict[str, np.ndarray]:
    """The encoder's inputs: two token prompts from the example, the second one padded (at
    its start, as for decoders); or the example's speech features."""
    if "input_ids" not in plan.input_names:
        return {name: _to_numpy(t)[:2] for name, t in zip(plan.input_names, plan.example.flat_tensors())}
    ids = _to_numpy(plan.example.kwargs["input_ids"])[:2].astype(np.int64)
    return {"input_ids": ids, "attention_mask": _left_padded_mask(ids)}


def _decoder_start(plan: Plan) -> int:
    from shardex._source import hf_config

    config = hf_config(plan.source)
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 0


def _seq2seq_reference(plans, memory, encoder_inputs, start, cross_mask, new_tokens) -> GenerationReference:
    """PyTorch's encoder, then its decoder's one pass over the start token and `new_tokens - 1`
    fed tokens (random ids of the decoder's vocabulary), weights streamed block by block."""
    from shardex._source import hf_config

    run = {c: StreamedReference(plans[c], memory, record=False) for c in ("encoder", "decoder")}
    tensors = {k: torch.from_numpy(v) for k, v in encoder_inputs.items()}
    hidden = run["encoder"]((), tensors)["last_hidden_state"]
    context = {k: torch.from_numpy(v) for k, v in cross_mask.items()} | {"encoder_hidden_states": hidden}
    vocab = hf_config(plans["decoder"].source).get_text_config(decoder=True).vocab_size
    fed = np.random.default_rng(0).integers(0, vocab, (start.shape[0], new_tokens - 1), dtype=np.int64)
    ids = np.concatenate([start, fed], axis=1)
    output = run["decoder"]((), {"input_ids": torch.from_numpy(ids)} | context)
    return GenerationReference(ids, np.ones_like(ids), 1, {"logits": _to_numpy(output["logits"])})
