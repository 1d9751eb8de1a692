"""The on-disk token cache, its fingerprints, and the provenance of a source for run reports.

**Cache.** :func:`calibration_samples` and :func:`evaluation_windows` keep their results under
``<cache_dir>/tokens/``. The key hashes the tokenizer's content, the source spec, the local files
(the SHA-256 of files up to 64 MiB, size + mtime for larger ones) and every size parameter,
plus the BOS id put first in every window when there is one (entries without BOS keep the key
they had before BOS existed: their windows are the same). On a cache hit nothing is loaded or
tokenised. A calibration entry also keeps the distinct tokens its windows were drawn from
(:class:`~prox24_lightning.data.windows.CalibrationWindows`), so a warm cache can still warn about
overlapping windows; a ``random_windows`` entry written before it kept that count is recomputed
once.
Cache entries are written with :func:`prox24_lightning.artifacts.atomic_write`, so readers (other
ranks, a concurrent run) see either no file or a complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor

from ..artifacts import atomic_write, file_sha256
from ..paths import default_cache_dir
from .sources import TextSource, load_documents, to_source
from .windows import (
    CalibrationMode,
    CalibrationWindows,
    check_seqlen,
    sample_calibration,
)

__all__ = [
    "calibration_samples",
    "calibration_set",
    "evaluation_windows",
    "source_provenance",
    "tokenizer_fingerprint",
]

log = logging.getLogger(__name__)

# Bump when the layout or meaning of cached tensors changes, so stale caches are ignored.
_CACHE_VERSION = 1
# Files up to this size are fingerprinted by content; larger ones by size + mtime (hashing a
# 300 MB C4 shard on every run would cost seconds).
_HASH_LIMIT = 64 * 2**20


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its token ids.

    Fast tokenizers are hashed through their full serialisation (vocabulary, merges,
    normalizer, post-processor), others through their vocabulary and special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        Hex digest.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()


def _file_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    if st.st_size <= _HASH_LIMIT:
        return {"sha256": file_sha256(path)}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _source_fingerprint(source: TextSource) -> dict[str, Any]:
    spec = asdict(source)
    if source.kind.reads_hub(source):
        return {"spec": spec, "hub": True}
    # Local content, not the path, decides validity: an edited file invalidates the entry.
    return {"spec": spec, "files": [_file_fingerprint(f) for f in source.kind.files(source)]}


def source_provenance(source: TextSource | Mapping[str, Any] | str) -> dict[str, Any]:
    """What a run report needs to reproduce the data of ``source``.

    Args:
        source: The source spec.

    Returns:
        ``{"spec": ..., "files": [{"path", "size", "sha256"}, ...]}`` for local files (the full
        SHA-256 of every file, whatever its size), or ``{"spec": ..., "hub": {...}}`` with what
        the source's kind records of its hub dataset (id and file or config and split); see
        :meth:`~prox24_lightning.data.sources.SourceKind.provenance`.
    """
    source = to_source(source)
    return source.kind.provenance(source)


def _cached(
    kind: str,
    source: TextSource,
    tokenizer: Any,
    params: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    compute: Callable[[], tuple[Tensor, dict[str, Any]]],
    meta_keys: tuple[str, ...] = (),
) -> tuple[Tensor, dict[str, Any]]:
    """``compute()``'s tensor and metadata, from the cache when an entry has them all.

    ``meta_keys`` are the metadata an entry must hold to be a hit: an entry written before a key
    existed is recomputed (its tensor would be the same, but the caller needs the key too).
    """
    if not use_cache:
        return compute()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = {
        "version": _CACHE_VERSION,
        "kind": kind,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": _source_fingerprint(source),
        "params": params,
    }
    blob = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
    path = root / "tokens" / f"{kind}-{source.name}-{digest}.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == blob:
                meta = payload.get("meta", {})
                if all(k in meta for k in meta_keys):
                    log.debug("token cache hit: %s", path)
                    return payload["input_ids"], meta
                log.debug("token cache entry %s lacks %s: recomputing", path, meta_keys)
        except Exception as err:  # a truncated or foreign file: recompute and overwrite it
            log.warning("ignoring unreadable token cache file %s (%s)", path, err)
    log.info("tokenising %s for %s (cache miss, writing %s)", source.name, kind, path)
    tensor, meta = compute()
    with atomic_write(path) as tmp:
        torch.save({"key": blob, "input_ids": tensor, "meta": meta}, tmp)
    return tensor, meta


def calibration_samples(
    source: TextSource | Mapping[str, Any] | str,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    mode: CalibrationMode = "random_windows",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    bos_token_id: int | None = None,
) -> Tensor:
    """Calibration windows of ``source``, cached on disk.

    Args:
        source: The source spec.
        tokenizer: A Hugging Face tokenizer.
        nsamples: Number of windows.
        seqlen: Tokens per window.
        mode: ``random_windows`` (Wanda/SparseGPT, uses ``seed``) or ``packed`` (the paper's).
        seed: Seed of ``random_windows``; ignored by ``packed``.
        cache_dir: Cache root; default :func:`~prox24_lightning.paths.default_cache_dir`.
        use_cache: Read and write the cache.
        bos_token_id: Put this id first in every window (see
            :func:`~prox24_lightning.data.windows.resolve_bos`); ``None``: no BOS added.

    Returns:
        ``LongTensor [nsamples, seqlen]`` on the CPU.
    """
    return calibration_set(
        source,
        tokenizer,
        nsamples=nsamples,
        seqlen=seqlen,
        mode=mode,
        seed=seed,
        cache_dir=cache_dir,
        use_cache=use_cache,
        bos_token_id=bos_token_id,
    ).input_ids


def calibration_set(
    source: TextSource | Mapping[str, Any] | str,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    mode: CalibrationMode = "random_windows",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    bos_token_id: int | None = None,
) -> CalibrationWindows:
    """:func:`calibration_samples` with the distinct tokens the windows were drawn from.

    Arguments as :func:`calibration_samples`. The count comes from the cache entry too, so the
    caller can warn about overlapping windows without tokenising anything on a cache hit.

    Returns:
        :class:`~prox24_lightning.data.windows.CalibrationWindows`.
    """
    source = to_source(source)
    check_seqlen(seqlen, None)
    if mode not in get_args(CalibrationMode):
        raise ValueError(f"mode must be one of {get_args(CalibrationMode)}, got {mode!r}")
    params = {"mode": mode, "nsamples": nsamples, "seqlen": seqlen}
    if mode == "random_windows":
        params["seed"] = seed
    if bos_token_id is not None:
        params["bos_token_id"] = bos_token_id

    def compute() -> tuple[Tensor, dict[str, Any]]:
        docs = load_documents(source, cache_dir=cache_dir)
        windows = sample_calibration(
            docs,
            tokenizer,
            mode=mode,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            bos_token_id=bos_token_id,
        )
        return windows.input_ids, {"distinct_tokens": windows.distinct_tokens}

    # Only random_windows has a count to need; packed entries stay valid as they are.
    need = ("distinct_tokens",) if mode == "random_windows" else ()
    ids, meta = _cached(
        "calibration", source, tokenizer, params, cache_dir, use_cache, compute, need
    )
    return CalibrationWindows(ids, meta.get("distinct_tokens"))


def evaluation_windows(
    source: TextSource | Mapping[str, Any] | str,
    tokenizer: Any,
    *,
    seqlen: int,
    max_windows: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    bos_token_id: int | None = None,
) -> Tensor:
    """Perplexity windows of ``source`` under its kind's protocol, cached on disk.

    The kind's :meth:`~prox24_lightning.data.sources.SourceKind.evaluation_windows` makes them:
    ``c4`` and ``c4_validation`` use the C4 protocol
    (:func:`~prox24_lightning.data.windows.c4_validation_windows`; first ``max_documents`` or
    1100 documents, at most ``max_windows`` or 256 windows), the others by default the WikiText2
    protocol (:func:`~prox24_lightning.data.windows.wikitext2_windows`; all documents joined
    with ``"\\n\\n"``, at most ``max_windows`` windows). The protocol's tag
    (``eval_protocol``) is part of the cache key.

    Args:
        source: The source spec.
        tokenizer: A Hugging Face tokenizer.
        seqlen: Tokens per window.
        max_windows: Cap on the number of windows (replaces the C4 protocol's 256).
        cache_dir: Cache root; default :func:`~prox24_lightning.paths.default_cache_dir`.
        use_cache: Read and write the cache.
        bos_token_id: Put this id first in every window; ``None``: no BOS added.

    Returns:
        ``LongTensor [n_windows, seqlen]`` on the CPU.
    """
    source = to_source(source)
    check_seqlen(seqlen, None)
    kind = source.kind
    params = {"seqlen": seqlen, "max_windows": max_windows, "protocol": kind.eval_protocol}
    if bos_token_id is not None:
        params["bos_token_id"] = bos_token_id

    def compute() -> tuple[Tensor, dict[str, Any]]:
        docs = load_documents(source, cache_dir=cache_dir)
        windows = kind.evaluation_windows(
            source,
            docs,
            tokenizer,
            seqlen=seqlen,
            max_windows=max_windows,
            bos_token_id=bos_token_id,
        )
        return windows, {}

    return _cached("eval", source, tokenizer, params, cache_dir, use_cache, compute)[0]
