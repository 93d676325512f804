"""Hugging Face Hub ids as sources: ``"org/name"`` resolved to a snapshot directory of the HF cache.

The files stay in the cache (``HF_HUB_CACHE``, default ``HF_HOME/hub``): its snapshot directory
``models--org--name/snapshots/<commit>/`` holds symlinks into ``blobs/`` and is read like any
checkpoint directory. Only what an export or a runtime reads is fetched: config, generation
config, safetensors files and their index, tokenizer files (and the model's own code with
``trust_remote_code``), all at the top level of the repository.

A full commit hash names immutable files, so it is looked up in the cache before the Hub is asked
(``shardex verify`` re-resolves an export's recorded commit this way). A branch or tag asks the Hub
for its current commit, unless ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from shardex._errors import SourceError
from shardex._source import safetensors_files

logger = logging.getLogger("shardex")

HUB_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
# huggingface_hub matches `*` across '/': this keeps every pattern to the repository's top level.
SUBFOLDERS = "*/*"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` as the Hub spells ids (no factory ``:``, no path syntax such as ``./``)."""
    return bool(REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text


def resolve_hub_id(repo_id: str, *, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """The snapshot directory of `repo_id` at `revision` (default: the main branch) in the HF
    cache, downloading what is missing. Its name is the resolved commit hash."""
    try:
        from huggingface_hub import constants, errors, snapshot_download
    except ImportError as e:
        raise SourceError(f"Hub id {repo_id!r} needs huggingface_hub: pip install 'shardex[hf]'.") from e
    cache_dir, offline = _environment(constants)
    patterns = [*HUB_FILES, "*.py"] if trust_remote_code else list(HUB_FILES)
    request = {
        "repo_id": repo_id,
        "revision": revision,
        "cache_dir": cache_dir,
        "endpoint": os.environ.get("HF_ENDPOINT") or None,
        "allow_patterns": patterns,
        "ignore_patterns": SUBFOLDERS,
    }
    name = f"{repo_id}@{revision}" if revision else repo_id
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        path = None
        if offline or COMMIT.fullmatch(revision or ""):
            try:
                path = snapshot_download(**request, local_files_only=True)
            except errors.LocalEntryNotFoundError:
                path = None
            lacking = _lacking(path) if path else None
            if offline and (path is None or lacking):
                raise _offline_miss(repo_id, revision, cache, lacking)
            if lacking:
                path = None
        if path is None:
            logger.info("hub: fetching %s into %s", name, cache)
            path = snapshot_download(**request, tqdm_class=_download_bar())
    except errors.RevisionNotFoundError:
        raise SourceError(
            f"revision {revision!r} of Hub model {repo_id!r} does not exist; pass a branch, tag or commit "
            "hash it has (--revision)."
        ) from None
    except errors.GatedRepoError:
        raise SourceError(
            f"Hub model {repo_id!r} is gated: accept its terms at https://huggingface.co/{repo_id} and set "
            "HF_TOKEN to a token of that account."
        ) from None
    except errors.RepositoryNotFoundError:
        raise SourceError(
            f"source {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub (a private "
            "one needs HF_TOKEN); check the path or the Hub id."
        ) from None
    except errors.LocalEntryNotFoundError as e:
        cause = _first_line(e.__cause__ or e)
        raise SourceError(
            f"source {name!r} is not a local path, and as a Hub id it is not in the cache {cache} and the "
            f"Hugging Face Hub cannot be reached ({cause}); check the path, the network (and HF_ENDPOINT), "
            "or point HF_HOME at a cache that has it."
        ) from None
    except (errors.HfHubHTTPError, errors.HFValidationError) as e:
        raise SourceError(f"cannot fetch Hub model {name!r}: {_first_line(e)}") from None
    commit = os.path.basename(path)
    assert COMMIT.fullmatch(commit), f"Bug: {path} is not a snapshot directory of the HF cache"
    logger.info("hub: %s is commit %s (%s)", name, commit, path)
    return path


def _environment(constants) -> tuple[str | None, bool]:
    """The cache directory and offline mode as the environment says now. huggingface_hub reads
    HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when first imported (transformers imports it
    early), so a process that sets them later (a notebook, a test) would be ignored."""
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    if cache_dir is None and os.environ.get("HF_HOME"):
        cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE
    return (os.path.expanduser(cache_dir) if cache_dir else None), offline


def _lacking(path: str) -> str | None:
    """What a cached snapshot lacks of a checkpoint, if anything: an earlier AutoConfig or
    tokenizer call may have cached only a few files of the same commit."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "no config.json"
    try:
        safetensors_files(path)
    except SourceError as e:
        return str(e)
    return None


def _offline_miss(repo_id: str, revision: str | None, cache: str, lacking: str | None) -> SourceError:
    """Name what the cache lacks: the model, the revision (listing those it has), or files."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    fix = "unset HF_HUB_OFFLINE to download it, or point HF_HOME at a cache that has it"
    if not os.path.isdir(repo_dir):
        return SourceError(
            f"source {repo_id!r} is not a local path, and as a Hub id it is not in the cache {cache} "
            f"(HF_HUB_OFFLINE is set); check the path, or {fix}."
        )
    name = f"revision {revision or 'main'!r} of Hub model {repo_id!r}"
    if lacking:
        return SourceError(
            f"{name} is only partly in the cache ({lacking}) and HF_HUB_OFFLINE is set; {fix}."
        )
    refs_dir = os.path.join(repo_dir, "refs")
    cached = sorted(os.listdir(refs_dir)) if os.path.isdir(refs_dir) else []
    return SourceError(
        f"{name} is not in the cache {cache} (cached revisions: {', '.join(cached) or 'none'}) and "
        f"HF_HUB_OFFLINE is set; {fix}."
    )


def _download_bar() -> type:
    """huggingface_hub's progress bars, shown when shardex's progress log is on (the CLI: stderr
    is a terminal, or --verbose; never with --quiet), updated every 30 s when not on a terminal."""
    from huggingface_hub.utils import tqdm

    show = logger.isEnabledFor(logging.INFO)

    class DownloadBar(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = not show
            kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30)
            super().__init__(*args, **kwargs)

    return DownloadBar


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
