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

from shardex._plan import Plan
from shardex._verify import CheckResult, SavedModelRunner, StreamedReference, _to_numpy, compare

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
    example = plan.example.kwargs["past_key_values"]
    return [
        tuple((batch, *layer[kind].shape[1:2], 0, *layer[kind].shape[3:]) for kind in ("key", "value"))
        for layer in example
    ]


def reference_generation(plan: Plan, memory: dict[str, torch.Tensor], new_tokens: int) -> GenerationReference:
    """PyTorch's greedy decoding of `new_tokens` tokens, weights streamed block by block."""
    reference = StreamedReference(plan, memory, record=False)
    ids, mask = generation_prompt(plan)
    past = tuple(
        {
            "key": torch.zeros(key, dtype=reference.compute),
            "value": torch.zeros(value, dtype=reference.compute),
        }
        for key, value in _empty_past(plan, ids.shape[0])
    )
    step_ids, step_mask = ids, mask
    tokens, step_logits, prefill_logits = [], [], None
    for step in range(new_tokens):
        kwargs = {
            "input_ids": torch.from_numpy(step_ids),
            "attention_mask": torch.from_numpy(step_mask),
            "position_ids": torch.from_numpy(_positions(step_mask)[:, -step_ids.shape[1] :]),
            "past_key_values": past,
        }
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
        past = output["present"]
        step_ids = next_token[:, None].astype(np.int64)
        step_mask = np.concatenate([step_mask, np.ones((step_mask.shape[0], 1), np.int64)], axis=1)
    return GenerationReference(ids, mask, np.stack(tokens, axis=1), prefill_logits, step_logits)


def verify_generation(
    plan: Plan,
    output_dir: str,
    reference: GenerationReference,
    atol: float,
    rtol: float,
    promote: bool,
) -> GenerationCheck:
    """ONNX Runtime's steps on ``model.onnx`` as saved, fed PyTorch's tokens: its greedy choice
    and logits at every step."""
    runner = SavedModelRunner(output_dir, promote)
    example = {name: _to_numpy(t) for name, t in zip(plan.input_names, plan.example.flat_tensors())}
    batch = reference.input_ids.shape[0]
    feeds_past = {}
    for i, shapes in enumerate(_empty_past(plan, batch)):
        for kind, shape in zip(("key", "value"), shapes):
            name = f"past_key_values.{i}.{kind}"
            dtype = np.float32 if promote else example[name].dtype
            feeds_past[name] = np.zeros(shape, dtype)
    step_ids, step_mask = reference.input_ids, reference.attention_mask
    choices, decode_checks, prefill = [], [], None
    for step in range(reference.tokens.shape[1]):
        feeds = {
            "input_ids": step_ids,
            "attention_mask": step_mask,
            "position_ids": _positions(step_mask)[:, -step_ids.shape[1] :],
            **feeds_past,
        }
        outputs = dict(zip(runner.output_names, runner.run({n: feeds[n] for n in runner.input_names})))
        logits = outputs["logits"]
        if step == 0:
            real = reference.attention_mask.astype(bool)
            prefill = compare(
                "generation: prefill logits", logits[real], reference.prefill_logits[real], atol, rtol
            )
        else:
            decode_checks.append(
                compare(
                    f"generation: decode step {step} logits",
                    logits[:, -1],
                    reference.step_logits[step - 1],
                    atol,
                    rtol,
                )
            )
        choices.append(logits[:, -1].argmax(-1))
        feeds_past = {
            n.replace("present.", "past_key_values.", 1): v
            for n, v in outputs.items()
            if n.startswith("present.")
        }
        step_ids = reference.tokens[:, step : step + 1].astype(np.int64)  # PyTorch's token, for both
        step_mask = np.concatenate([step_mask, np.ones((batch, 1), np.int64)], axis=1)
    worst = max(decode_checks, key=lambda c: (not c.passed, c.max_abs_diff), default=None)
    check = GenerationCheck(
        new_tokens=reference.tokens.shape[1],
        torch_tokens=reference.tokens.tolist(),
        onnx_tokens=np.stack(choices, axis=1).tolist(),
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
