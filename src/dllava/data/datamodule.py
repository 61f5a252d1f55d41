"""Stream LLaVA conversation shards (webdataset tars) into padded model batches.

Training reads a resampled, endless stream split by node and worker and cut into epochs of a fixed
number of samples, so every rank sees the same number of batches (unequal shard counts otherwise hang
DDP). Validation and test read every sample exactly once, in order. The streams and how dropped data is
counted (``batch["data_counts"]``) are in :mod:`dllava.data.reader`. Samples are decoded by our own
``decode_sample`` (image bytes through PIL, ``json`` through ``json.loads``): webdataset's default
decoders also unpickle ``.pyd``/``.pickle`` members, and nothing read from a shard may execute code.

``data.batch_size`` is per device; the global batch is ``batch_size x devices x num_nodes x
accumulate_grad_batches``.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader

from dllava.data.conversation import IGNORE_INDEX, encode_conversation, final_exchange
from dllava.data.reader import (
    EpochStart, ResampledStream, TextOnlySample, exact_stream, resampled_stream, shards_per_rank_warning,
)
from dllava.data.records import IMAGE_KEYS


def resolve_urls(spec: str | Sequence[str], key: str = "data.urls") -> list[str]:
    """Expand brace patterns (``train-{000000..000019}.tar``) and globs into existing shard paths.

    Raises ``FileNotFoundError`` naming ``key`` and the missing path, so a mistyped path fails at
    start-up rather than as an empty stream.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for expanded in braceexpand(str(item)):
            if "://" in expanded or expanded.startswith("pipe:"):
                urls.append(expanded)
            elif any(c in expanded for c in "*?["):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(_missing_message(key, expanded))
                urls.extend(matches)
            elif not os.path.exists(expanded):
                raise FileNotFoundError(_missing_message(key, expanded))
            else:
                urls.append(expanded)
    if not urls:
        raise FileNotFoundError(f"{key} names no shards: {spec!r}")
    return urls


def _missing_message(key: str, path: str) -> str:
    return (
        f"{key}: no shard at {path!r}. Create the synthetic shards with "
        f"`python -m dllava.data.synthetic --out {Path(path).parent}` (train.py does this on first use "
        f"when data.synthetic is set), or point {key} at existing webdataset shards."
    )


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> ``{"key", "image": PIL RGB or None, "record": dict}`` without any pickle."""
    if "json" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no json member")
    record = json.loads(sample["json"])
    image = None
    for key in IMAGE_KEYS:
        if key in sample:
            image = Image.open(io.BytesIO(sample[key]))
            image.load()
            image = image.convert("RGB")
            break
    return {"key": sample.get("__key__"), "image": image, "record": record}


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5 ``pad`` aspect mode: centre the image on a square of the processor's mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class SamplePreprocessor:
    """Turns a decoded sample into tensors for training and for generation-based evaluation (LLaVA-1.5).

    The image is padded to a square of the processor's mean colour, then CLIP-preprocessed; the
    conversation is rendered with the vicuna_v1 template, ``<image>`` at the front of its turn, and
    truncated at ``max_length`` unless that would cut the image span (then it raises
    ``ImageSpanTruncated``, and the reader drops and counts the sample). Picklable (it holds only the
    processor), so dataloader workers can run it.
    """

    def __init__(self, processor: Any, num_image_tokens: int, max_length: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        mean = getattr(processor.image_processor, "image_mean", [0.5, 0.5, 0.5])
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        image = expand_to_square(image, self.fill)
        return self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        record = sample["record"]
        if sample["image"] is None:
            raise TextOnlySample(f"sample {sample['key']!r} has no image member ({'/'.join(IMAGE_KEYS)})")
        conv = record["conversations"]
        train = encode_conversation(conv, self.tokenizer, self.num_image_tokens, max_length=self.max_length)
        prompt = encode_conversation(
            conv, self.tokenizer, self.num_image_tokens, for_generation=True, max_length=self.max_length
        )
        question, answer = final_exchange(conv)
        kinds = record.get("kinds") or []
        return {
            "id": record.get("id", sample["key"]),
            "input_ids": train.input_ids,
            "labels": train.labels,
            "image_span": train.image_span,
            "answer_span": train.answer_span,
            "prompt_ids": prompt.input_ids,
            "pixel_values": self.pixel_values(sample["image"]),
            "question": question,
            "answer": answer,
            "kind": kinds[-1] if kinds else "all",
        }


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad training ids/labels, left-pad generation prompts, stack images."""
    longest = max(len(s["input_ids"]) for s in samples)
    longest_prompt = max(len(s["prompt_ids"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    prompt_ids = torch.full((batch, longest_prompt), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, longest_prompt), dtype=torch.long)
    for i, s in enumerate(samples):
        n, m = len(s["input_ids"]), len(s["prompt_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        attention_mask[i, :n] = 1
        prompt_ids[i, longest_prompt - m :] = torch.tensor(s["prompt_ids"])
        prompt_mask[i, longest_prompt - m :] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "image_span": torch.tensor([s["image_span"] for s in samples]),
        "answer_span": torch.tensor([s["answer_span"] for s in samples]),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "ids": [s["id"] for s in samples],
        "questions": [s["question"] for s in samples],
        "answers": [s["answer"] for s in samples],
        "kinds": [s["kind"] for s in samples],
    }


class _Collate:
    """Picklable collate with the pad id bound."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_id)


def iter_records(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every record's JSON from ``urls`` in order, without decoding images (for baselines and stats)."""
    # nodesplitter=None: every shard on whichever rank calls this (the default refuses under DDP/FSDP)
    dataset = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False, nodesplitter=None)
    for sample in dataset:
        if "json" in sample:
            yield json.loads(sample["json"])


class TrainLoader(DataLoader):
    """The training DataLoader: at every ``iter()`` it asks ``next_epoch()`` where the stream starts and
    hands that to the dataset before the workers copy it. Workers are therefore not persistent (a
    persistent worker keeps the copy of the first epoch); starting them costs little per epoch."""

    def __init__(self, dataset: ResampledStream, next_epoch: Callable[[], EpochStart], num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.next_epoch = next_epoch

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.next_epoch())
        return super().__iter__()


class LlavaDataModule(L.LightningDataModule):
    """Lightning wrapper over the shard streams; the processor is loaded from the model directory."""

    def __init__(
        self,
        train_urls: str | Sequence[str],
        val_urls: str | Sequence[str],
        processor: str,
        test_urls: str | Sequence[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        epoch_samples: int = 3200,
        shuffle_buffer: int = 1000,
        max_length: int | None = 512,
        seed: int = 0,
        synthetic: dict[str, Any] | None = None,
        answer_kinds: Sequence[str] | None = None,
    ) -> None:
        """``answer_kinds``: the record ``kinds`` whose final answers are scored by exact match (the
        synthetic task's short answers); None for free-form data. ``module.answer_kinds`` reads it."""
        super().__init__()
        self.answer_kinds = None if answer_kinds is None else list(answer_kinds)
        for name, value in (("data.batch_size", batch_size), ("data.epoch_samples", epoch_samples)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"data.max_length must be >= 1 or null (the tokenizer's model_max_length), got {max_length}")
        self.train_urls, self.val_urls, self.test_urls = train_urls, val_urls, test_urls
        self.processor_path = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.epoch_samples = epoch_samples
        self.shuffle_buffer = shuffle_buffer
        self.max_length = max_length
        self.seed = seed
        self.synthetic = synthetic
        self.processor: Any = None
        self.preprocess: SamplePreprocessor | None = None
        # training data position: (epoch, per logical worker (raw samples, batches) trained this epoch)
        self._train_position: tuple[int, list[tuple[int, int]]] | None = None
        self._restored_position: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        """Generate the synthetic shards on first use (once per node, before any rank reads them)."""
        if self.synthetic is not None:
            ensure_synthetic(**self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is not None:
            return
        from dllava.model.loading import load_processor

        self.processor = load_processor(self.processor_path)
        num_image_tokens = count_image_tokens(self.processor)
        max_length = self.max_length or self.processor.tokenizer.model_max_length  # null: the tokenizer's
        # The image ends no earlier than after the system prompt; below that every sample is dropped.
        shortest = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": ""}]
        image_end = encode_conversation(shortest, self.processor.tokenizer, num_image_tokens).image_span[1]
        if max_length <= image_end:
            raise ValueError(
                f"data.max_length must exceed {image_end} (system prompt + {num_image_tokens} image tokens of "
                f"{self.processor_path}), got {max_length}"
            )
        self.preprocess = SamplePreprocessor(self.processor, num_image_tokens, max_length)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_batches_per_worker(self) -> int:
        """Batches each dataloader worker yields per epoch (open_clip's recipe, see module docstring)."""
        batches = math.ceil(self.epoch_samples / (self.batch_size * self.world_size))
        return math.ceil(batches / max(1, self.num_workers))

    def train_dataloader(self) -> TrainLoader:
        urls = resolve_urls(self.train_urls, "data.train_urls")
        dataset = resampled_stream(
            urls, decode_sample, self.preprocess, _Collate(self.processor.tokenizer.pad_token_id),
            self.batch_size, self.train_batches_per_worker(), self.shuffle_buffer, self.seed,
        )
        return TrainLoader(dataset, self._next_train_epoch, num_workers=self.num_workers)

    # -- the training data position (see "Resuming" in the README) ---------------------------------
    def _layout(self) -> dict[str, int]:
        """What a recorded position is only valid under: another layout draws other streams."""
        return {"world_size": self.world_size, "num_workers": max(1, self.num_workers), "batch_size": self.batch_size,
                "batches_per_worker": self.train_batches_per_worker(), "seed": self.seed}

    def _next_train_epoch(self) -> EpochStart:
        """Where a pass over the training loader starts: at the recorded position (restored from a
        checkpoint, or recorded as batches are trained) when its epoch has batches left, else at the
        start of the next epoch.

        Only trained batches move the position, so Lightning's epoch counter is not consulted: at a
        resume Lightning iterates the loader twice before training from it, while its restart
        bookkeeping is unsettled (resumed from an epoch-end checkpoint of epoch 0, its
        ``epoch_progress.current.processed`` reads 2 at the second ``iter()`` while it trains epoch 1).
        A pass that ends before its epoch does (``limit_train_batches``) is continued by the next one.
        """
        workers = max(1, self.num_workers)
        self._apply_restored_position()
        position = self._train_position
        if position is None:
            epoch, consumed = 0, [(0, 0)] * workers
        elif any(batches < self.train_batches_per_worker() for _, batches in position[1]):
            epoch, consumed = position[0], list(position[1])
        else:
            epoch, consumed = position[0] + 1, [(0, 0)] * workers
        self._train_position = (epoch, consumed)
        trained = sum(batches for _, batches in consumed)
        return EpochStart(epoch, tuple(consumed) if trained else (), trained % workers)

    def _apply_restored_position(self) -> None:
        """Make a loaded checkpoint's position this rank's, once (the layout is known only now)."""
        if self._restored_position is None:
            return
        state, self._restored_position = self._restored_position, None
        layout = self._layout()
        if state["layout"] != layout:
            finished = all(b >= state["layout"]["batches_per_worker"] for rank in state["consumed"] for _, b in rank)
            if not finished:
                warnings.warn(
                    f"data: the checkpoint's training data position was recorded with {state['layout']}, this "
                    f"run has {layout}: epoch {state['epoch']} is streamed again from its start, not from where "
                    "it stopped (keep trainer.devices, data.num_workers, data.batch_size, data.epoch_samples "
                    "and data.seed to resume exactly)",
                    stacklevel=3,
                )
            done = layout["batches_per_worker"] if finished else 0
            self._train_position = (state["epoch"], [(0, done)] * layout["num_workers"])
            return
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._train_position = (state["epoch"], [(int(raw), int(b)) for raw, b in state["consumed"][rank]])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of each training batch as it is trained (Lightning calls this for the
        batch about to be trained, not for those its fetcher or the workers hold in advance)."""
        if isinstance(batch, dict) and "data_position" in batch:
            epoch, worker, raw, batches = batch.pop("data_position")
            if self._train_position is None or self._train_position[0] != epoch:
                raise RuntimeError(f"data: a batch of epoch {epoch} arrived while the loader streams "
                                   f"{self._train_position and self._train_position[0]}")
            self._train_position[1][worker] = (raw, batches)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training data position of every rank, gathered (a collective: Lightning builds a
        checkpoint on every rank). Each rank's workers drop different samples, so their positions
        differ; a tensor all_gather carries them without pickling."""
        self._apply_restored_position()  # a checkpoint written before the resumed run trained keeps it
        if self._train_position is None:
            return {}
        epoch, consumed = self._train_position
        mine = torch.tensor(consumed, dtype=torch.long)
        if self.world_size > 1:
            gathered = self.trainer.strategy.all_gather(mine.to(self.trainer.strategy.root_device)).cpu()
        else:
            gathered = mine.unsqueeze(0)
        return {"train_position": {"epoch": epoch, "consumed": gathered.tolist(), "layout": self._layout()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where the checkpoint's trained batches stopped."""
        if "train_position" in state_dict:
            self._restored_position = state_dict["train_position"]

    def _exact_loader(self, spec: str | Sequence[str], key: str) -> wds.WebLoader:
        urls = resolve_urls(spec, key)
        uneven = shards_per_rank_warning(len(urls), self.world_size, key)
        if uneven:
            warnings.warn(uneven, stacklevel=2)
        per_rank = max(1, len(urls) // self.world_size)
        workers = min(self.num_workers, per_rank)  # a worker without a shard would yield nothing
        dataset = exact_stream(
            urls, decode_sample, self.preprocess, _Collate(self.processor.tokenizer.pad_token_id),
            self.eval_batch_size,
        )
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers)

    def val_dataloader(self) -> wds.WebLoader:
        return self._exact_loader(self.val_urls, "data.val_urls")

    def test_dataloader(self) -> wds.WebLoader:
        if self.test_urls is None:
            raise ValueError("data.test_urls is not set; set it or run with test=false")
        return self._exact_loader(self.test_urls, "data.test_urls")


def ensure_synthetic(out: str, **spec: Any) -> dict[str, Any]:
    """Generate the synthetic task into ``out`` unless a matching generation is already there.

    A generation with other settings is never overwritten silently: the error says what differs.
    """
    from dllava.data import synthetic

    info = synthetic.read_info(out)
    if info is None:
        return synthetic.generate(out, **spec)
    expected = {k: v for k, v in spec.items() if k not in ("workers",)}
    found = {
        "train": info["splits"]["train"]["records"],
        "val": info["splits"]["val"]["records"],
        "test": info["splits"]["test"]["records"],
        **{k: info.get(k) for k in expected if k not in ("train", "val", "test")},
    }
    if "kinds" in expected:  # info.json lists them in canonical order
        expected["kinds"] = list(synthetic.check_kinds(expected["kinds"]))
    differs = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: on disk {a}, configured {b}" for k, (a, b) in differs.items())
        raise ValueError(
            f"data.synthetic: {out} holds a different generation ({detail}). Delete it to regenerate, "
            "or set data.synthetic.out to another directory."
        )
    return info


def count_image_tokens(processor: Any) -> int:
    """Image tokens per image as HF's LlavaProcessor expands them (patches, plus CLS unless dropped)."""
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    size = crop.get("height") if isinstance(crop, dict) else None
    if size is None:
        size = processor.image_processor.size["shortest_edge"]
    tokens = (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        tokens -= 1
    return tokens
