"""Running exports in plain ONNX Runtime, as a user without shardex would, and the independent
greedy-decoding loop the generation tests compare with transformers' `generate`."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch


def session(model_path) -> ort.InferenceSession:
    return ort.InferenceSession(os.fspath(model_path), providers=["CPUExecutionProvider"])


def run_onnx(model_path, feeds: dict[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    return session(model_path).run(None, {k: np.asarray(v) for k, v in feeds.items()})


def token_feeds(batch: int, seq: int, vocab: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers derives them from a (left-padded) attention mask."""
    position_ids = np.cumsum(attention_mask, -1) - 1
    position_ids[attention_mask == 0] = 1
    return position_ids.astype(np.int64)


def step_feeds(
    sess: ort.InferenceSession,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    past: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Feeds of one decoder step: `past` maps ``past_key_values.{i}.key/value`` (a state-space
    model's ``past_conv.{i}`` / ``past_ssm.{i}``) to arrays; None means an empty past (length 0,
    what runtimes feed on the first step; a zero state)."""
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    names = {i.name: i for i in sess.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = positions(attention_mask)[:, -input_ids.shape[1] :]
    for name, meta in names.items():
        if name.startswith(("past_conv.", "past_ssm.")):  # a state-space model's recurrent state
            feeds[name] = (
                np.zeros((input_ids.shape[0], *meta.shape[1:]), np.float32) if past is None else past[name]
            )
        elif name.startswith("past_key_values."):
            if past is None:
                _, heads, _, head_dim = meta.shape
                dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
                feeds[name] = np.zeros((input_ids.shape[0], heads, 0, head_dim), dtype)
            else:
                feeds[name] = past[name]
    return feeds


def greedy_onnx(model_path, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding through the KV cache: the prompt with an empty past, then one token at a time."""
    sess = session(model_path)
    outputs = [o.name for o in sess.get_outputs()]
    past = None
    tokens = []
    ids, mask = input_ids, attention_mask
    for _ in range(new_tokens):
        results = dict(zip(outputs, sess.run(None, step_feeds(sess, ids, mask, past))))
        next_token = results["logits"][:, -1].argmax(-1)
        tokens.append(next_token)
        past = {past_name(n): v for n, v in results.items() if n.startswith("present")}
        ids = next_token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    return np.stack(tokens, axis=1)


def past_name(present: str) -> str:
    """The input a present output feeds on the next step (transformers.js's renaming)."""
    for before, after in (
        ("present_conv.", "past_conv."),
        ("present_ssm.", "past_ssm."),
        ("present.", "past_key_values."),
    ):
        if present.startswith(before):
            return after + present[len(before) :]
    return present


def greedy_transformers(
    model, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int
) -> list[list[int]]:
    """transformers' greedy `generate`: per row, its new tokens up to and including the
    end-of-sequence token where it stops (`min_new_tokens` is not used: it masks the eos logit,
    which would change the argmax)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, input_ids.shape[1] :].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])
    return rows


def same_greedy_tokens(onnx_tokens: np.ndarray, transformers_tokens: list[list[int]]) -> bool:
    """The loop's tokens equal transformers' wherever transformers decoded (up to its eos)."""
    return all(list(row[: len(e)]) == e for row, e in zip(onnx_tokens.tolist(), transformers_tokens))


def left_padded_prompts(batch: int = 2, length: int = 7, vocab: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths, left-padded: row i has i * 2 padding tokens."""
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).numpy()
    mask = np.ones_like(ids)
    for row in range(batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids, mask
