"""Shard streams that survive bad data: read, shuffle, decode, preprocess, batch, and count what was lost.

Two modes, both plain webdataset ``DataPipeline`` stages:

* :func:`resampled_stream` (training): every (rank, dataloader worker) draws shards with replacement
  from its own RNG, seeded by ``(seed, rank, worker, epoch)``, shuffles samples while they are still
  bytes (before decode), and yields exactly ``batches_per_worker`` full batches per epoch. Every rank
  therefore gets the same number of batches whatever the shard sizes, so DDP never waits on a rank
  that ran dry. The epoch is given (:meth:`ResampledStream.set_epoch`, which the datamodule calls before
  each pass), never counted by the stream: a worker's copy would restart its count at 0 in a resumed
  process and replay epoch 0 (as webdataset's ``ResampledShards`` does, so shards are drawn here by
  :func:`draw_shards`). Each batch carries ``batch["data_position"] = (epoch, worker, raw, batches)``:
  after it, that worker has consumed ``raw`` shuffled raw samples of the epoch (dropped ones included)
  and given ``batches`` batches. A pass can start there (:class:`EpochStart`): the worker re-draws its
  shards and shuffle and skips ``raw`` samples as bytes, without decoding them, then yields the
  epoch's remaining batches, the same as the uninterrupted epoch's.
* :func:`exact_stream` (validation, test): the shard list split by rank, then by worker, read once in
  order, the last batch partial. Deterministic; every sample once across ranks and workers.

Bad data is skipped, never fatal. A shard that cannot be opened or breaks off (truncated, not a tar)
ends that shard; a sample that cannot be decoded or preprocessed is dropped. Each event is counted by
the process's :class:`DataCounts` and warned about. Counting across DataLoader worker processes: each
worker holds its own copy of the pipeline and so its own counter, and every batch carries, under
``batch["data_counts"]``, what its worker dropped since its previous batch, e.g. ``{"skipped": 1,
"too_long": 0, "text_only": 0}``. These deltas add up: summing them over batches and ranks gives the
job's total, so the LightningModule can log them with ``reduce_fx="sum"`` (see :data:`COUNT_KEYS`).
An exact pass holds each batch back by one sample so that its last batch carries the drops after its
last sample; only a worker with no readable sample at all reports nothing. A shard cut exactly at a
member boundary reads as a shorter shard and is not detected.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener
from webdataset.utils import pytorch_worker_info

from dllava.data.conversation import ImageSpanTruncated

# Keys of batch["data_counts"]: skipped (unreadable shard or sample), too_long (truncation would cut the
# image span), text_only (no image; every sample of a batch needs one).
COUNT_KEYS = ("skipped", "too_long", "text_only")
MAX_CONSECUTIVE_SKIPS = 1000
WARNINGS_PER_KIND = 20


class TextOnlySample(ValueError):
    """A sample without an image: the model splices exactly one image into every sample of a batch."""


class DataCounts:
    """Per-process counts of dropped data; also the webdataset ``handler`` of the decode/preprocess stages.

    Raises once ``max_consecutive`` unreadable samples or shards (or empty shards) come without a good
    sample in between: a stream that is all errors (wrong paths, a wrong tokenizer) must fail, not spin
    forever.
    """

    def __init__(self, max_consecutive: int = MAX_CONSECUTIVE_SKIPS) -> None:
        self.max_consecutive = max_consecutive
        self.totals = dict.fromkeys(COUNT_KEYS, 0)
        self._reported = dict.fromkeys(COUNT_KEYS, 0)
        self._consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        """Count and warn about one dropped sample; return True so the stream continues."""
        if isinstance(exn, ImageSpanTruncated):
            kind = "too_long"
        elif isinstance(exn, TextOnlySample):
            kind = "text_only"
        else:
            kind = "skipped"
        self.record(kind, f"data: dropped a sample ({kind}): {type(exn).__name__}: {exn}", exn)
        return True

    def shard_failed(self, url: str, exn: Exception) -> None:
        """Count a shard that could not be opened or broke off; its remaining samples are lost."""
        self.record("skipped", f"data: skipped the rest of shard {url}: {type(exn).__name__}: {exn}", exn)

    def record(self, kind: str, message: str, exn: Exception | None = None) -> None:
        self.totals[kind] += 1
        if self.totals[kind] <= WARNINGS_PER_KIND:  # text-only data can be 6% of mix665k: warn, then count
            if self.totals[kind] == WARNINGS_PER_KIND:
                message += f" (further '{kind}' drops in this worker are only counted)"
            warnings.warn(message, stacklevel=2)
        if kind == "skipped":  # text-only and too-long samples are valid data, and may come in long runs
            self._no_progress(message, exn)

    def empty_shard(self, url: str) -> None:
        """A shard with no samples is not an error, but endless empty shards must not spin silently."""
        self._no_progress(f"shard {url} holds no samples", None)

    def _no_progress(self, message: str, exn: Exception | None) -> None:
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"data: {self._consecutive} samples or shards in a row gave nothing (last: {message}); "
                "check data.*_urls, the shards and data.processor"
            ) from exn

    def good(self) -> None:
        self._consecutive = 0

    def take(self) -> dict[str, int]:
        """Counts since the previous call (what the next batch reports)."""
        delta = {k: self.totals[k] - self._reported[k] for k in COUNT_KEYS}
        self._reported = dict(self.totals)
        return delta


# Stages are small classes rather than closures so a pipeline pickles (spawned DataLoader workers);
# stages of one pipeline share its DataCounts, and pickling the pipeline whole keeps them sharing it.
class ReadShards:
    """Stage: ``{"url"}`` dicts -> raw samples (tar members grouped by key); a broken shard counts once."""

    def __init__(self, counts: DataCounts) -> None:
        self.counts = counts

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in src:
            url = source.get("url", "?")
            samples = 0
            try:
                streams = url_opener([source], handler=reraise_exception)
                members = tar_file_expander(streams, handler=reraise_exception)
                for sample in group_by_keys(members, handler=reraise_exception):
                    samples += 1
                    yield sample
            except Exception as exn:
                self.counts.shard_failed(url, exn)
                continue
            if samples == 0:
                self.counts.empty_shard(url)


def draw_shards(urls: Sequence[str], rng: random.Random) -> Iterator[dict[str, Any]]:
    """Stage source: shards drawn with replacement, endlessly (webdataset's ``ResampledShards`` draws the
    same ``randint`` sequence, but counts its epoch itself; ours takes its RNG from the caller)."""
    while True:
        yield {"url": urls[rng.randint(0, len(urls) - 1)]}


def seeded_shuffle(src: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Stage: webdataset's buffer shuffle of undecoded samples, drawing from ``rng``."""
    # webdataset's own buffer shuffle (private in 1.0.x; webdataset is pinned <1.1 in pyproject)
    yield from wds.filters._shuffle(iter(src), bufsize, initial=min(100, bufsize), rng=rng)


class RawCount:
    """Stage: counts the raw samples leaving the shuffle, after dropping the first ``skip`` of them.

    ``consumed`` is this worker's position in its epoch's shuffled raw stream; a batch records it when
    its last sample completes it (the stages after this one pull one sample at a time), so a resume
    skips exactly the raw samples that reached trained batches or were dropped before them.
    """

    def __init__(self, skip: int) -> None:
        self.skip, self.consumed = skip, 0

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        for sample in src:
            self.consumed += 1
            if self.consumed > self.skip:  # skipped samples are never decoded: a resume is cheap
                yield sample


@dataclass(frozen=True)
class EpochStart:
    """Where the training stream starts: its epoch, and per logical worker ``(raw samples, batches)``
    already consumed in that epoch (empty: from the start).

    DataLoader worker ``slot`` plays logical worker ``(slot + first_worker) % workers``: the DataLoader
    takes batches round-robin from worker 0, so after ``k`` trained batches the uninterrupted run's next
    batch comes from logical worker ``k % workers``, and the resumed loader's worker 0 must be that one.
    """

    epoch: int = 0
    consumed: tuple[tuple[int, int], ...] = ()
    first_worker: int = 0


class ResampledStream(IterableDataset):
    """The training stream: each epoch a pure function of ``(seed, epoch, rank, worker)``, see module doc.

    ``set_epoch`` (called in the main process before the DataLoader starts its workers, which copy the
    dataset at each ``iter()``: workers must not be persistent) chooses the epoch and where it starts.
    Each batch carries ``batch["data_position"] = (epoch, worker, raw samples consumed, batches)``.
    """

    def __init__(self, urls: Sequence[str], decode: Callable[[dict[str, Any]], Any],
                 preprocess: Callable[[Any], Any], collate: Callable[[list[Any]], dict[str, Any]],
                 batch_size: int, batches_per_worker: int, shuffle_buffer: int, seed: int) -> None:
        super().__init__()
        if not urls:
            raise ValueError("the training stream needs at least one shard")
        self.urls, self.decode, self.preprocess, self.collate = list(urls), decode, preprocess, collate
        self.batch_size, self.batches_per_worker = batch_size, batches_per_worker
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.counts = DataCounts()  # per process: each worker's copy counts its own drops
        self.start = EpochStart()

    def set_epoch(self, start: EpochStart | int) -> None:
        """Stream epoch ``start`` (an int: from its beginning) at the next ``iter()``."""
        self.start = EpochStart(start) if isinstance(start, int) else start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _, slot, workers = pytorch_worker_info()
        epoch = self.start.epoch
        worker = (slot + self.start.first_worker) % workers
        raw_done, batches_done = self.start.consumed[worker] if self.start.consumed else (0, 0)
        # the seeds webdataset's ResampledShards(deterministic=True) and our former shuffle stage used
        # for the epoch they counted: an uninterrupted run draws the same data as before
        shard_rng = random.Random(wds.utils.make_seed(rank * 1000 + worker, epoch, self.seed))
        samples: Iterable[Any] = ReadShards(self.counts)(draw_shards(self.urls, shard_rng))
        if self.shuffle_buffer > 1:
            shuffle_rng = random.Random(wds.utils.make_seed(self.seed, rank, worker, epoch))
            samples = seeded_shuffle(samples, self.shuffle_buffer, shuffle_rng)
        raw = RawCount(raw_done)
        samples = wds.map(self.decode, handler=self.counts)(raw(samples))
        samples = wds.map(self.preprocess, handler=self.counts)(samples)
        batches = BatchWithCounts(self.batch_size, self.collate, self.counts, partial=False)(samples)
        for done, batch in enumerate(islice(batches, self.batches_per_worker - batches_done), batches_done + 1):
            batch["data_position"] = (epoch, worker, raw.consumed, done)
            yield batch


class BatchWithCounts:
    """Stage: samples -> collated batches, each with ``data_counts`` (drops since the previous batch).

    A finite pass (``partial``) holds each full batch back until the next sample arrives, so drops
    after the last sample still reach a batch: its final batch carries them.
    """

    def __init__(self, batch_size: int, collate: Callable[[list[Any]], dict[str, Any]], counts: DataCounts,
                 partial: bool) -> None:
        self.batch_size, self.collate, self.counts, self.partial = batch_size, collate, counts, partial

    def _emit(self, batch: list[Any]) -> dict[str, Any]:
        return {**self.collate(batch), "data_counts": self.counts.take()}

    def __call__(self, src: Iterable[Any]) -> Iterator[dict[str, Any]]:
        batch: list[Any] = []
        held: list[Any] | None = None
        for sample in src:
            self.counts.good()
            if held is not None:
                yield self._emit(held)
                held = None
            batch.append(sample)
            if len(batch) == self.batch_size:
                if self.partial:
                    held = batch
                else:
                    yield self._emit(batch)
                batch = []
        if held is not None:
            if batch:
                yield self._emit(held)
            else:
                batch = held
        if batch and self.partial:
            yield self._emit(batch)


def resampled_stream(
    urls: Sequence[str],
    decode: Callable[[dict[str, Any]], Any],
    preprocess: Callable[[Any], Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int,
    batches_per_worker: int,
    shuffle_buffer: int = 1000,
    seed: int = 0,
) -> ResampledStream:
    """Endless training stream cut into epochs of ``batches_per_worker`` full batches per worker."""
    return ResampledStream(urls, decode, preprocess, collate, batch_size, batches_per_worker, shuffle_buffer, seed)


def exact_stream(
    urls: Sequence[str],
    decode: Callable[[dict[str, Any]], Any],
    preprocess: Callable[[Any], Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int,
) -> wds.DataPipeline:
    """One in-order pass: shards split by rank then by worker, every sample once, last batch partial."""
    counts = DataCounts()
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.split_by_node,
        wds.split_by_worker,
        ReadShards(counts),
        wds.map(decode, handler=counts),
        wds.map(preprocess, handler=counts),
        BatchWithCounts(batch_size, collate, counts, partial=True),
    )


def shards_per_rank_warning(num_shards: int, world_size: int, key: str) -> str | None:
    """Why an exact pass over ``num_shards`` on ``world_size`` ranks is uneven, or None when it is even."""
    if world_size <= 1 or num_shards % world_size == 0:
        return None
    return (
        f"{key}: {num_shards} shard(s) over {world_size} ranks: ranks read unequal numbers of batches "
        f"({'some read none' if num_shards < world_size else 'shards are split whole'}). Fine for validation "
        "(no collective per step), but use a multiple of the world size for equal work."
    )
