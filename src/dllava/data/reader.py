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
* :func:`exact_stream` (validation, test): every sample once across ranks and workers, and the same
  number of batches on every rank whatever the shard count. The split is by SAMPLE, not by shard: the
  shards' samples are counted up front from their tar headers (:func:`count_samples`, no decoding), the
  global sample sequence is cut into one contiguous block per rank (sizes differ by at most one) and each
  rank's block into one per dataloader worker. Every rank yields exactly ``ceil(total / world_size)``
  samples, split over its workers the same way on every rank; a rank whose block is shorter, or whose
  samples were dropped (unreadable, too long, text-only), fills up with *padding* samples (a blank image
  and a one-word conversation, every label ignored, ``batch["valid"]`` False). Under FSDP every forward
  is a collective, so a rank with fewer batches would hang the others; the metrics skip padding rows.
  A rank reads only the shards its block overlaps, skipping (without decoding) the samples before it.

Bad data is skipped, never fatal. A shard that cannot be opened or breaks off (truncated, not a tar)
ends that shard; a sample that cannot be decoded or preprocessed is dropped. Each event is counted by
the process's :class:`DataCounts` and warned about, naming the shard and the sample key. Counting
across DataLoader worker processes: each
worker holds its own copy of the pipeline and so its own counter, and every batch carries, under
``batch["data_counts"]``, what its worker dropped since its previous batch, e.g. ``{"skipped": 1,
"too_long": 0, "text_only": 0}``. These deltas add up: summing them over batches and ranks gives the
job's total, so the LightningModule can log them with ``reduce_fx="sum"`` (see :data:`COUNT_KEYS`).
An exact pass holds each batch back by one sample so that its last batch carries the drops after its
last sample (padding makes every worker with a share of the split yield at least one sample). A shard
cut exactly at a member boundary reads as a shorter shard and is not detected.
"""

from __future__ import annotations

import math
import os
import random
import re
import tarfile
import warnings
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener
from webdataset.utils import pytorch_worker_info

from dllava.data.conversation import ImageSpanTruncated

# Keys of batch["data_counts"]: skipped (unreadable shard or sample), too_long (truncation would cut the
# image span), text_only (no image; every sample of a batch needs one).
COUNT_KEYS = ("skipped", "too_long", "text_only")
MAX_CONSECUTIVE_SKIPS = 1000
WARNINGS_PER_KIND = 20


class TextOnlySample(ValueError):
    """A sample without an image: the model splices exactly one image into every sample of a batch."""


# Attribute under which decode/preprocess stages attach (shard url, sample key) to the exception of a
# dropped sample, so the warning names it (webdataset hands a stage's handler the exception only).
SAMPLE_ORIGIN = "dllava_sample_origin"


def name_origin(exn: Exception, url: Any, key: Any) -> Exception:
    """Record on ``exn`` which shard and sample it came from (see :data:`SAMPLE_ORIGIN`); returns ``exn``."""
    if getattr(exn, SAMPLE_ORIGIN, None) is None:
        try:
            setattr(exn, SAMPLE_ORIGIN, (url, key))
        except AttributeError:  # an exception type with __slots__: the warning then names no sample
            pass
    return exn


class DataCounts:
    """Per-process counts of dropped data; also the webdataset ``handler`` of the decode/preprocess stages.

    Raises once ``max_consecutive`` unreadable samples or shards (or empty shards) come without a good
    sample in between: a stream that is all errors (wrong paths, a wrong tokenizer) must fail, not spin
    forever. ``None`` for a finite pass, which cannot spin (an exact pass checks at its end instead that
    it read something, see :func:`check_eval_pass`).
    """

    def __init__(self, max_consecutive: int | None = MAX_CONSECUTIVE_SKIPS) -> None:
        self.max_consecutive = max_consecutive
        self.totals = dict.fromkeys(COUNT_KEYS, 0)
        self._reported = dict.fromkeys(COUNT_KEYS, 0)
        self._consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        """Count and warn about one dropped sample (naming its shard and key when known); return True so
        the stream continues."""
        if isinstance(exn, ImageSpanTruncated):
            kind = "too_long"
        elif isinstance(exn, TextOnlySample):
            kind = "text_only"
        else:
            kind = "skipped"
        origin = getattr(exn, SAMPLE_ORIGIN, None)
        which = f"sample {origin[1]!r} of shard {origin[0]}" if origin else "a sample"
        self.record(kind, f"data: dropped {which} ({kind}): {type(exn).__name__}: {exn}", exn)
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
        if self.max_consecutive is not None and self._consecutive >= self.max_consecutive:
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
def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard, in order: tar members grouped by key (with ``__key__`` and
    ``__url__``), undecoded. An unreadable or broken shard raises; the file is closed when the iteration
    ends or the generator is closed, so a caller may stop early (``contextlib.closing``)."""
    opened = list(url_opener([{"url": url}], handler=reraise_exception))
    try:
        members = tar_file_expander(opened, handler=reraise_exception)
        yield from group_by_keys(members, handler=reraise_exception)
    finally:
        for source in opened:
            source["stream"].close()


class ReadShards:
    """Stage: ``{"url"}`` dicts -> raw samples (tar members grouped by key); a broken shard counts once."""

    def __init__(self, counts: DataCounts) -> None:
        self.counts = counts

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in src:
            url = source.get("url", "?")
            samples = 0
            try:
                for sample in shard_samples(url):
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


# -- exact passes (validation, test) ---------------------------------------------------------------
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members


def _sample_prefix(name: str) -> str | None:
    """The sample key a tar member belongs to, or None for a member webdataset skips."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    return base_plus_ext(name)[0]


def count_samples(url: str) -> int:
    """Samples in one shard as :class:`ReadShards` groups them (consecutive members sharing a key).

    A local file is counted from its tar headers alone (seeking past the data); other urls (``pipe:``,
    ``http``) are streamed through :func:`shard_samples` without decoding. A shard that breaks off counts what precedes the
    break, an unreadable one counts 0 (the reader meets the same error, warns and counts it, and the
    exact pass pads for what it could not read).
    """
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        count = 0
        try:
            for _ in shard_samples(url):
                count += 1
        except Exception:
            pass
        return count
    keys = _KeyCounter()
    try:
        with tarfile.open(url, "r:*") as archive:
            for info in archive:
                if info.isreg():
                    keys.add(info.name)
    except Exception:
        pass
    return keys.count


class _KeyCounter:
    """Counts the samples of a member sequence: a new key starts a new sample."""

    def __init__(self) -> None:
        self.count, self.current = 0, None

    def add(self, name: str) -> None:
        prefix = _sample_prefix(name)
        if prefix is not None and prefix != self.current:
            self.count, self.current = self.count + 1, prefix


def block(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``total`` items are cut into ``parts`` contiguous blocks
    whose sizes differ by at most one."""
    return total * index // parts, total * (index + 1) // parts


def rank_share(total: int, world_size: int) -> int:
    """Samples (real or padding) every rank yields in an exact pass over ``total`` samples."""
    return math.ceil(total / world_size)


class ExactSlice:
    """The samples of one (rank, dataloader worker) in an exact pass: a source stage and a padding stage.

    Rank ``r`` owns global samples ``block(total, world_size, r)`` and yields ``rank_share`` samples; the
    rank's slots are cut over its workers with :func:`block` again, identically on every rank, so every
    rank's workers yield the same numbers of samples and the loader the same number of batches. The
    worker is known only when iteration starts (inside the worker process), hence the methods.
    """

    def __init__(self, urls: Sequence[str], sizes: Sequence[int], rank: int, world_size: int,
                 counts: DataCounts, padding: dict[str, Any]) -> None:
        if len(urls) != len(sizes):
            raise ValueError(f"{len(urls)} urls but {len(sizes)} shard sizes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.urls, self.sizes = list(urls), [int(n) for n in sizes]
        self.rank, self.world_size = rank, world_size
        self.counts, self.padding = counts, padding

    def slots(self) -> tuple[int, int, int]:
        """``(start, stop, slots)``: this worker's real global samples and how many samples it yields."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        total = sum(self.sizes)
        share = rank_share(total, self.world_size)
        rank_start, rank_stop = block(total, self.world_size, self.rank)
        first, last = block(share, workers, worker)  # this worker's slots within the rank's share
        real = rank_stop - rank_start
        return rank_start + min(first, real), rank_start + min(last, real), last - first

    def read(self) -> Iterator[dict[str, Any]]:
        """Source: the raw samples of this worker's block, undecoded; a broken shard counts once."""
        start, stop, _ = self.slots()
        offset = 0
        for url, size in zip(self.urls, self.sizes):
            lo, hi = max(start, offset) - offset, min(stop, offset + size) - offset
            offset += size
            if lo >= hi:
                continue
            try:
                with closing(shard_samples(url)) as samples:  # the block may end before the shard does
                    yield from islice(samples, lo, hi)
            except Exception as exn:
                self.counts.shard_failed(url, exn)

    def pad(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Stage: pass the preprocessed samples through, then pad up to this worker's number of slots."""
        _, _, slots = self.slots()
        yielded = 0
        for sample in src:
            yielded += 1
            yield sample
        for _ in range(slots - yielded):
            yield self.padding


def exact_stream(
    urls: Sequence[str],
    sizes: Sequence[int],
    decode: Callable[[dict[str, Any]], Any],
    preprocess: Callable[[Any], Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int,
    padding: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
) -> wds.DataPipeline:
    """One in-order pass, split by sample over ranks then workers (see :class:`ExactSlice`): every real
    sample once, ``rank_share(sum(sizes), world_size)`` samples per rank, the last batch of each worker
    partial. ``sizes`` are the shards' sample counts (:func:`count_samples`), the same on every rank;
    ``padding`` is a preprocessed sample with ``valid`` False."""
    counts = DataCounts(max_consecutive=None)
    part = ExactSlice(urls, sizes, rank, world_size, counts, padding)
    return wds.DataPipeline(
        part.read,
        wds.map(decode, handler=counts),
        wds.map(preprocess, handler=counts),
        part.pad,
        BatchWithCounts(batch_size, collate, counts, partial=True),
    )


def check_eval_pass(split: str, urls: Sequence[str], expected: int, real: int, max_skip_share: float) -> None:
    """After a complete exact pass over ``expected`` samples of which ``real`` were used (summed over
    ranks): fail when none was, warn when more than ``max_skip_share`` of them were dropped."""
    shown = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
    if real == 0:
        raise RuntimeError(
            f"data.{split}_urls: the {split} pass used no sample ({expected} counted in {shown}): every "
            "shard or sample was unreadable, too long or text-only (see the data warnings above). Check "
            f"data.{split}_urls, the shards, data.max_length and data.processor."
        )
    dropped = expected - real
    if dropped > max_skip_share * expected:
        warnings.warn(
            f"data.{split}_urls: the {split} pass dropped {dropped} of {expected} samples "
            f"({dropped / expected:.1%} > data.max_skip_share={max_skip_share}); its metrics cover the "
            f"other {real} only. See the data warnings above, and {split}/data_* for the reasons.",
            stacklevel=2,
        )
