"""A tiny real tokenizer for test checkpoints, built offline with the `tokenizers` library.

The onnxruntime-genai model builder loads the checkpoint's tokenizer with `AutoTokenizer`, and a
runtime layout copies tokenizer files, so test checkpoints need one. A byte-level BPE is trained
on a fixed text (deterministic), small enough to fit the tiny models' vocabularies, with the
special tokens at the ids the tiny configs use (`<unk>` 0, `<s>` 1 = bos, `</s>` 2 = eos).
"""

from __future__ import annotations

import json
import os

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_TEXT = (
    "the quick brown fox jumps over the lazy dog. a model exported to onnx generates text one token "
    "at a time, reading and writing its key value cache. shards of weights stream from the checkpoint "
    "into files that the runtime maps, and every block is verified against pytorch."
)


def save_tokenizer(directory, *, vocab_size: int = 128) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return their names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator([_TEXT] * 4, trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "Bug: special token ids moved"
    assert tokenizer.get_vocab_size() <= vocab_size, (
        f"Bug: {tokenizer.get_vocab_size()} tokens > {vocab_size}"
    )
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
