"""Runs a generation runtime on an exported model directory, inside that runtime's environment.

Executed as a script by a `.venv-runtimes/*` python (see scripts/setup_runtimes.sh), which has
the runtime but neither shardex nor the test suite: a JSON request on stdin, a JSON answer on
stdout. The runtimes are imported inside the commands, so the module also imports in the main
environment (for `until_eos`).

    {"command": "genai_greedy", "model_dir": ..., "prompts": [[ids], ...], "max_new_tokens": N}
    {"command": "optimum_greedy", ...same...}
    {"command": "optimum_seq2seq_greedy", "model_dir": ..., "inputs": {"input_ids": [[...]], ...}, "max_new_tokens": N}
    {"command": "genai_encode", "model_dir": ..., "text": "..."}

Greedy answers are each row's new tokens, cut after the first end-of-sequence token as the
runtime knows it (genai_config.json for genai, the generation config for Optimum). Rows of
unequal length are left-padded with the pad token id.
"""

from __future__ import annotations

import json
import os
import sys


def until_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    """`tokens` up to and including the first end-of-sequence token."""
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def left_pad(prompts: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-padded rows and their attention mask; a prompt containing `pad` is refused, since
    genai derives the mask from pad tokens."""
    if any(pad in row for row in prompts):
        raise ValueError(f"prompts must not contain the pad token id {pad}; choose other test ids")
    width = max(len(row) for row in prompts)
    rows = [[pad] * (width - len(row)) + list(row) for row in prompts]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in prompts]
    return rows, mask


def genai_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import numpy as np
    import onnxruntime_genai as og

    with open(os.path.join(model_dir, "genai_config.json")) as f:
        model_config = json.load(f)["model"]
    eos = model_config.get("eos_token_id")
    rows, _ = left_pad(prompts, model_config.get("pad_token_id", 0))
    model = og.Model(model_dir)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=len(rows), max_length=len(rows[0]) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(rows, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [
        until_eos([int(t) for t in generator.get_sequence(i)[len(rows[0]) :]], eos) for i in range(len(rows))
    ]


def optimum_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from optimum.onnxruntime import ORTModelForCausalLM

    return hf_greedy(ORTModelForCausalLM.from_pretrained(model_dir), prompts, max_new_tokens)


def optimum_seq2seq_greedy(model_dir: str, inputs: dict[str, list], max_new_tokens: int) -> list[list[int]]:
    """Optimum's encoder-decoder classes (`ORTModelForSeq2SeqLM`, `ORTModelForSpeechSeq2Seq` for
    speech) on `model_dir`, greedy."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq

    speech = "input_features" in inputs
    model = (ORTModelForSpeechSeq2Seq if speech else ORTModelForSeq2SeqLM).from_pretrained(model_dir)
    return hf_seq2seq_greedy(model, inputs, max_new_tokens)


def hf_seq2seq_greedy(model, inputs: dict[str, list], max_new_tokens: int) -> list[list[int]]:
    """An encoder-decoder's `generate(do_sample=False)`, no eos forced at the length limit: each
    row's new tokens (Whisper's `generate` returns no start token, the others do), cut after
    eos. `inputs` are the encoder's (token ids and mask, or features)."""
    import torch

    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    config = model.generation_config
    with torch.no_grad():
        out = model.generate(
            **tensors,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            forced_eos_token_id=None,
        )
    start = config.decoder_start_token_id
    return [until_eos(row[1:] if row[0] == start else row, config.eos_token_id) for row in out.tolist()]


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`model.generate(do_sample=False)` of a transformers model or an Optimum ORTModel."""
    import torch

    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    rows, mask = left_pad(prompts, pad)
    with torch.no_grad():
        out = model.generate(
            torch.tensor(rows),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    return [until_eos(row[len(rows[0]) :], eos) for row in out.tolist()]


def genai_encode(model_dir: str, text: str) -> list[int]:
    import onnxruntime_genai as og

    return [int(t) for t in og.Tokenizer(og.Model(model_dir)).encode(text)]


COMMANDS = {
    "genai_greedy": genai_greedy,
    "optimum_greedy": optimum_greedy,
    "optimum_seq2seq_greedy": optimum_seq2seq_greedy,
    "genai_encode": genai_encode,
}


def main() -> int:
    request = json.load(sys.stdin)
    result = COMMANDS[request.pop("command")](**request)
    json.dump({"result": result}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
