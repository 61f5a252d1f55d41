"""Stream LLaVA conversation shards (webdataset tars) into padded model batches.

Training reads a resampled, endless stream split by node and worker and cut into epochs of a fixed
number of samples, so every rank sees the same number of batches (unequal shard counts otherwise hang
DDP). Validation and test read every sample exactly once, in order, split by sample over ranks and padded
to the same number of batches on every rank (padding rows have ``batch["valid"]`` False). The streams and how dropped data is
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
    EpochStart, ResampledStream, TextOnlySample, check_eval_pass, count_samples, exact_stream, name_origin,
    rank_share, resampled_stream,
)
from dllava.data.records import IMAGE_KEYS, UnreadableImage, image_error
from dllava.families.llava import count_image_tokens, square_grid  # noqa: F401  (count_image_tokens: its former home)
from dllava.utils.checks import (
    check_bool, check_float, check_int, check_keys, check_mapping, check_str, check_str_list, check_urls,
)


def resolve_urls(spec: str | Sequence[str], key: str = "data.urls", synthetic: bool = False) -> list[str]:
    """Expand brace patterns (``train-{000000..000019}.tar``) and globs into existing shard paths.

    Raises ``FileNotFoundError`` naming ``key`` and the missing path, so a mistyped path fails at
    start-up rather than as an empty stream; ``synthetic`` (the synthetic task's shards) picks which
    tool the message says creates them.
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
                    raise FileNotFoundError(_missing_message(key, expanded, synthetic))
                urls.extend(matches)
            elif not os.path.exists(expanded):
                raise FileNotFoundError(_missing_message(key, expanded, synthetic))
            else:
                urls.append(expanded)
    if not urls:
        raise FileNotFoundError(f"{key} names no shards: {spec!r}")
    return urls


def _missing_message(key: str, path: str, synthetic: bool = False) -> str:
    """What to do about a missing shard: the synthetic generator when the data is the synthetic task
    (``synthetic``: ``data.synthetic`` is set), else the converter that writes shards from LLaVA JSON."""
    if synthetic:
        create = (
            f"Create the synthetic shards with `python -m dllava.data.synthetic --out {Path(path).parent}` "
            f"(train.py does this on first use into data.synthetic.out)"
        )
    else:
        create = (
            f"Convert LLaVA-format JSON and images into shards with `dllava-shards <data.json> --image-root "
            f"<image folder> --out {Path(path).parent}` (README \"Real data\", conf/data/llava_shards.yaml)"
        )
    return f"{key}: no shard at {path!r}. {create}, or point {key} at existing webdataset shards."


SYNTHETIC_INTS = {"train": 0, "val": 0, "test": 0, "seed": 0, "image_size": 1, "grid": 1, "samples_per_shard": 1, "workers": 1}


def check_synthetic_spec(spec: Any) -> None:
    """Types and ranges of ``data.synthetic`` (the generator's arguments), named by their config keys."""
    check_mapping("data.synthetic", spec)
    check_keys(
        "data.synthetic", spec, ("out", "kinds", "cell", "grid_sizes", "objects", "large_share", "short_suffix", *SYNTHETIC_INTS)
    )
    check_str("data.synthetic.out", spec.get("out"))
    for name, low in SYNTHETIC_INTS.items():
        if name in spec:
            check_int(f"data.synthetic.{name}", spec[name], low=low)
    if "kinds" in spec:
        check_str_list("data.synthetic.kinds", spec["kinds"], nonempty=True)
    cell = check_int("data.synthetic.cell", spec.get("cell"), low=16, optional=True)  # null: image_size // grid
    if cell is not None and cell % 2:
        raise ValueError(f"data.synthetic.cell must be even (each object sits in one quadrant of its cell), got {cell}")
    if spec.get("grid_sizes") is not None:  # null: one square grid
        check_grid_sizes("data.synthetic.grid_sizes", spec["grid_sizes"])
    objects = spec.get("objects")  # null: 2-4 objects per scene (the hard task: [6, 10])
    if objects is not None:
        if isinstance(objects, (str, bytes)) or not isinstance(objects, Sequence) or len(objects) != 2:
            raise ValueError(f"data.synthetic.objects must be a [min, max] pair, got {objects!r}")
        low = check_int("data.synthetic.objects[0]", objects[0], low=1)
        check_int("data.synthetic.objects[1]", objects[1], low=low)
    check_float("data.synthetic.large_share", spec.get("large_share"), low=0, high=1, optional=True)  # null: none
    if "short_suffix" in spec:  # LLaVA-1.5's "Answer the question using a single word or phrase." on one-word questions
        check_bool("data.synthetic.short_suffix", spec["short_suffix"])


def check_grid_sizes(key: str, value: Any) -> None:
    """A non-empty list of ``[rows, cols]`` pairs, each side 2..6 (the synthetic task names rows in words)."""
    from dllava.data.synthetic import MAX_SIDE

    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key} must be a non-empty list of [rows, cols] pairs, got {value!r}")
    for i, size in enumerate(value):
        if isinstance(size, (str, bytes)) or not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"{key}[{i}] must be a [rows, cols] pair, got {size!r}")
        for side in size:
            check_int(f"{key}[{i}]", side, low=2, high=MAX_SIDE)


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> ``{"key", "url", "image": PIL RGB or None, "record": dict}`` without any pickle.

    An error names the sample's shard and key for the reader's warning (:func:`name_origin`)."""
    try:
        return _decode(sample)
    except Exception as exn:
        raise name_origin(exn, sample.get("__url__"), sample.get("__key__"))


def _decode(sample: dict[str, Any]) -> dict[str, Any]:
    if "json" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no json member")
    record = json.loads(sample["json"])
    image = None
    for key in IMAGE_KEYS:
        if key in sample:
            try:
                image = Image.open(io.BytesIO(sample[key]))
            except Image.UnidentifiedImageError as err:  # PIL's message names a BytesIO by its address
                raise UnreadableImage(f"its {key} member: {image_error(err)}") from None
            image.load()
            image = image.convert("RGB")
            break
    return {"key": sample.get("__key__"), "url": sample.get("__url__"), "image": image, "record": record}


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

    pads_to_square = True  # object positions are mapped through the square the image is padded to
    fixed_image_tokens = True  # every image gives the same count (the processor's)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        image = expand_to_square(image, self.fill)
        return self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def pixel_inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The model's pixel inputs for one image (LLaVA: ``pixel_values`` (3, H, W))."""
        return {"pixel_values": self.pixel_values(image)}

    def token_grid(self, pixels: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(rows, cols) of the image's tokens (LLaVA: the square patch grid) that object positions map to."""
        return square_grid(self.num_image_tokens)

    def picture_grid(self, pixels: dict[str, torch.Tensor]) -> Any:
        """How the image's keep row is drawn (overlays): its token grid, or the family's panels."""
        return self.token_grid(pixels)

    def image_tokens(self, pixels: dict[str, torch.Tensor]) -> int:
        return self.num_image_tokens

    def encode(self, conversations: list[dict[str, Any]], n_image: int, for_generation: bool = False) -> Any:
        """``conversations`` in this family's template (``for_generation``: the prompt up to the answer),
        the image as ``n_image`` tokens, truncated at ``max_length`` (never through the image)."""
        return encode_conversation(conversations, self.tokenizer, n_image, for_generation, max_length=self.max_length)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._encode(sample)
        except Exception as exn:  # the reader's warning names the shard and key
            raise name_origin(exn, sample.get("url"), sample.get("key"))

    def blank_image(self) -> Image.Image:
        """The image of a padding row: small, in the processor's mean colour."""
        return Image.new("RGB", (32, 32), self.fill)

    def padding(self) -> dict[str, Any]:
        """A sample that only fills an exact pass up to its rank's share (``valid`` False, nothing
        supervised): a blank image and a one-word exchange, preprocessed like every sample so the batch
        runs through the same forward and generation."""
        blank = self.blank_image()
        conv = [{"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "-"}]
        sample = self._encode({"key": "padding", "image": blank, "record": {"id": "padding", "conversations": conv}})
        return {**sample, "labels": [IGNORE_INDEX] * len(sample["labels"]), "kind": "padding", "valid": False}

    def _encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        record = sample["record"]
        if sample["image"] is None:
            raise TextOnlySample(f"sample {sample['key']!r} has no image member ({'/'.join(IMAGE_KEYS)})")
        conv = record["conversations"]
        pixels = self.pixel_inputs(sample["image"])
        n_image = self.image_tokens(pixels)
        train = self.encode(conv, n_image)
        prompt = self.encode(conv, n_image, for_generation=True)
        question, answer = final_exchange(conv)
        kinds = record.get("kinds") or []
        return {
            "id": record.get("id", sample["key"]),
            "input_ids": train.input_ids,
            "labels": train.labels,
            "image_span": train.image_span,
            "answer_span": train.answer_span,
            "prompt_ids": prompt.input_ids,
            **pixels,
            "question": question,
            "answer": answer,
            "kind": kinds[-1] if kinds else "all",
        }


class ChatSamplePreprocessor(SamplePreprocessor):
    """The same records for chat-template families with dynamic resolution (Qwen2.5-VL, Qwen3-VL).

    The conversation is rendered with the tokenizer's own chat template (:mod:`dllava.data.chat`), the
    image keeps its size (the processor rounds it to whole merged tokens, within its min/max pixels), so
    each sample has its own image-token count; pixels are flattened patches plus ``image_grid_thw``
    (:mod:`dllava.data.qwen_pixels`), concatenated over the batch by :func:`collate`.
    """

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.merge_size = int(processor.image_processor.merge_size)

    pads_to_square = False
    fixed_image_tokens = False

    def pixel_inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        from dllava.data.qwen_pixels import qwen_pixel_inputs

        return qwen_pixel_inputs(image, self.processor.image_processor)

    def token_grid(self, pixels: dict[str, torch.Tensor]) -> tuple[int, int]:
        _, h, w = (int(v) for v in pixels["image_grid_thw"][0])
        return h // self.merge_size, w // self.merge_size

    def image_tokens(self, pixels: dict[str, torch.Tensor]) -> int:
        from dllava.data.qwen_pixels import image_token_count

        return image_token_count(pixels["image_grid_thw"][0], self.merge_size)

    def encode(self, conversations: list[dict[str, Any]], n_image: int, for_generation: bool = False) -> Any:
        from dllava.data.chat import encode_chat

        return encode_chat(conversations, self.tokenizer, n_image, for_generation, max_length=self.max_length)

    def blank_image(self) -> Image.Image:
        from dllava.data.qwen_pixels import blank_image

        return blank_image(self.processor.image_processor)


class AnyresSamplePreprocessor(SamplePreprocessor):
    """The same records for anyres families (LLaVA-NeXT, LLaVA-OneVision): the image keeps its aspect
    ratio (base view plus crops, ``pixel_values`` (crops, 3, s, s) and ``image_sizes``), so each sample has
    its own image-token count; rendered with the vicuna_v1 template (``chat`` False, NeXT-vicuna) or the
    processor's chat template (OneVision's ChatML). ``token_grid`` is the base view's patch grid: the base
    view is the whole image resized (not padded), so object positions map onto its first tokens."""

    pads_to_square = False
    fixed_image_tokens = False

    def __init__(self, processor: Any, max_length: int, chat: bool) -> None:
        super().__init__(processor, num_image_tokens=0, max_length=max_length)  # counts come per image
        self.chat = chat

    def pixel_inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        out = self.processor.pixel_inputs([image])
        return {"pixel_values": out["pixel_values"][0], "image_sizes": out["image_sizes"][0]}

    def token_grid(self, pixels: dict[str, torch.Tensor]) -> tuple[int, int]:
        from dllava.families.llava_next import view_side

        side = view_side(self.processor.config)
        return side, side

    def image_tokens(self, pixels: dict[str, torch.Tensor]) -> int:
        return self.processor.image_tokens(pixels["image_sizes"].tolist())

    def picture_grid(self, pixels: dict[str, torch.Tensor]) -> Any:
        from dllava.families.llava_next import picture_panels

        return picture_panels(self.processor.config, pixels["image_sizes"].tolist())

    def encode(self, conversations: list[dict[str, Any]], n_image: int, for_generation: bool = False) -> Any:
        if not self.chat:
            return super().encode(conversations, n_image, for_generation)
        from dllava.data.chat import encode_chat

        return encode_chat(
            conversations, self.tokenizer, n_image, for_generation, max_length=self.max_length,
            image_token=self.processor.image_token, chat_template=self.processor.chat_template,
        )


def collate_pixels(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One image per sample: (B, 3, H, W) stacked; flattened patches concatenated in sample order plus
    ``image_grid_thw`` (B, 3) when the samples carry a grid (dynamic resolution); anyres crops
    zero-padded to the most crops (B, P, 3, s, s) plus ``image_sizes`` (B, 2), as HF's processors pad."""
    if "image_grid_thw" in samples[0]:
        from dllava.data.qwen_pixels import collate_qwen_pixels

        return collate_qwen_pixels(samples)
    if "image_sizes" in samples[0]:
        most = max(s["pixel_values"].shape[0] for s in samples)
        pixels = [s["pixel_values"] for s in samples]
        padded = [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) if p.shape[0] < most else p for p in pixels]
        return {"pixel_values": torch.stack(padded), "image_sizes": torch.stack([s["image_sizes"] for s in samples])}
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad training ids/labels, left-pad generation prompts, collate images
    (:func:`collate_pixels`); ``valid`` is False for the padding rows of an exact pass
    (:meth:`SamplePreprocessor.padding`)."""
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
        **collate_pixels(samples),
        "image_span": torch.tensor([s["image_span"] for s in samples]),
        "answer_span": torch.tensor([s["answer_span"] for s in samples]),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "ids": [s["id"] for s in samples],
        "questions": [s["question"] for s in samples],
        "answers": [s["answer"] for s in samples],
        "kinds": [s["kind"] for s in samples],
        "valid": torch.tensor([s.get("valid", True) for s in samples], dtype=torch.bool),
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
    """Lightning wrapper over the shard streams of LLaVA-format records (for every model family: the
    record is family-neutral, the preprocessing the processor's family's); the processor is loaded from
    the model directory. The name is kept: Lightning stores the data position under it in checkpoints."""

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
        max_skip_share: float = 0.05,
    ) -> None:
        """``answer_kinds``: the record ``kinds`` whose final answers are scored by exact match (the
        synthetic task's short answers); None for free-form data. ``module.answer_kinds`` reads it.
        ``max_skip_share``: a validation/test pass that drops more than this share of its samples warns
        (one that uses none fails)."""
        super().__init__()
        check_urls("data.train_urls", train_urls)
        check_urls("data.val_urls", val_urls)
        check_urls("data.test_urls", test_urls, optional=True)
        if processor is None:
            raise ValueError("data.processor is null: set it to a directory holding the tokenizer and image "
                             "processor (it defaults to model.pretrained, which this model does not set)")
        check_str("data.processor", processor)
        self.answer_kinds = check_str_list("data.answer_kinds", answer_kinds, optional=True)
        for name, value in (("data.batch_size", batch_size), ("data.epoch_samples", epoch_samples)):
            check_int(name, value, low=1)
        check_int("data.eval_batch_size", eval_batch_size, low=1, optional=True)  # null: data.batch_size
        check_int("data.num_workers", num_workers, low=0)
        check_int("data.shuffle_buffer", shuffle_buffer, low=0)  # 0 or 1: no shuffling
        check_int("data.max_length", max_length, low=1, optional=True)  # null: the tokenizer's model_max_length
        check_int("data.seed", seed, low=0, optional=True)  # null (with seed=null): not reproducible
        if synthetic is not None:
            check_synthetic_spec(synthetic)
        check_float("data.max_skip_share", max_skip_share, low=0, high=1)
        self.max_skip_share = max_skip_share
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
        self._sizes: dict[tuple[str, ...], list[int]] = {}
        self._eval_passes: dict[str, tuple[list[str], int]] = {}
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
        from dllava.model.loading import load_processor, processor_family

        self.processor = load_processor(self.processor_path)
        max_length = self.max_length or self.processor.tokenizer.model_max_length  # null: the tokenizer's
        self.preprocess = processor_family(self.processor_path).sample_preprocessor(self.processor, max_length)
        if self.preprocess.fixed_image_tokens:  # per-image counts are checked per sample (ImageSpanTruncated)
            self._check_max_length(max_length)
        if self.synthetic is not None:
            check_tokenizer_knows(self.processor.tokenizer, self.synthetic, self.processor_path)

    def _check_max_length(self, max_length: int) -> None:
        num_image_tokens = count_image_tokens(self.processor)
        # The image ends no earlier than after the system prompt; below that every sample is dropped.
        shortest = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": ""}]
        image_end = encode_conversation(shortest, self.processor.tokenizer, num_image_tokens).image_span[1]
        if max_length <= image_end:
            raise ValueError(
                f"data.max_length must exceed {image_end} (system prompt + {num_image_tokens} image tokens of "
                f"{self.processor_path}), got {max_length}"
            )

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def global_rank(self) -> int:
        return getattr(self.trainer, "global_rank", 0) if self.trainer is not None else 0

    def train_batches_per_worker(self) -> int:
        """Batches each dataloader worker yields per epoch (open_clip's recipe, see module docstring)."""
        batches = math.ceil(self.epoch_samples / (self.batch_size * self.world_size))
        return math.ceil(batches / max(1, self.num_workers))

    def train_dataloader(self) -> TrainLoader:
        urls = resolve_urls(self.train_urls, "data.train_urls", self.synthetic is not None)
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
        self._train_position = (state["epoch"], [(int(raw), int(b)) for raw, b in state["consumed"][self.global_rank]])

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

    def shard_sizes(self, urls: Sequence[str]) -> list[int]:
        """Samples per shard (tar headers only), counted once per url list and taken from rank 0, so
        every rank cuts the split identically even if its view of the files differed."""
        key = tuple(urls)
        if key not in self._sizes:
            sizes = [count_samples(url) for url in urls]
            strategy = getattr(self.trainer, "strategy", None)
            if self.world_size > 1 and strategy is not None:
                sizes = strategy.broadcast(sizes, src=0)
            self._sizes[key] = sizes
        return self._sizes[key]

    def _exact_loader(self, spec: str | Sequence[str], split: str) -> wds.WebLoader:
        """Every sample once, the same number of batches on every rank (``dllava.data.reader``)."""
        urls = resolve_urls(spec, f"data.{split}_urls", self.synthetic is not None)
        sizes = self.shard_sizes(urls)
        self._eval_passes[split] = (urls, sum(sizes))
        share = rank_share(sum(sizes), self.world_size)
        workers = min(self.num_workers, share)  # a worker without a slot would only cost a process
        dataset = exact_stream(
            urls, sizes, decode_sample, self.preprocess, _Collate(self.processor.tokenizer.pad_token_id),
            self.eval_batch_size, self.preprocess.padding(), self.global_rank, self.world_size,
        )
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers)

    def check_eval_pass(self, split: str, real: int, rows: int) -> None:
        """Called by the LightningModule after a validation/test pass with the samples it scored and the
        rows it saw (padding included), summed over ranks: fails when the pass used no sample, warns
        when more than ``max_skip_share`` were dropped. A partial pass (sanity check, limit_*_batches) is
        not judged."""
        if split not in self._eval_passes:
            return
        urls, expected = self._eval_passes[split]
        if rows < rank_share(expected, self.world_size) * self.world_size:
            return
        check_eval_pass(split, urls, expected, real, self.max_skip_share)

    def val_dataloader(self) -> wds.WebLoader:
        return self._exact_loader(self.val_urls, "val")

    def test_dataloader(self) -> wds.WebLoader:
        if self.test_urls is None:
            raise ValueError("data.test_urls is not set; set it or run with test=false")
        return self._exact_loader(self.test_urls, "test")


def check_tokenizer_knows(tokenizer: Any, spec: dict[str, Any], where: str) -> None:
    """Raise when a word-level tokenizer (the tiny models') has no id for words the synthetic task of
    ``spec`` (``data.synthetic``) uses: they would all become ``<unk>`` and the model would learn nothing
    from them (e.g. the ``detail`` kind with a tokenizer made before it)."""
    from dllava.data import synthetic

    unk = getattr(tokenizer, "unk_token_id", None)
    kinds = list(spec.get("kinds") or synthetic.CLASSIC_KINDS)
    if unk is None:
        return
    wide = any(side > len(synthetic.POSITION_WORDS) for size in spec.get("grid_sizes") or [] for side in size)
    words = set(synthetic.WIDE_WORDS if wide else synthetic.WORDS)
    words |= set(synthetic.DETAIL_WORDS) if "detail" in kinds else set()
    suffix = bool(spec.get("short_suffix")) and any(k in synthetic.ONE_WORD_KINDS for k in kinds)
    words |= set(synthetic.SHORT_ANSWER_SUFFIX_WORDS) if suffix else set()
    missing = sorted(w for w in words if tokenizer.convert_tokens_to_ids(w) == unk)
    if missing:
        raise ValueError(
            f"the tokenizer of {where} has no token for {missing[:10]} (words of data.synthetic.kinds={list(kinds)}"
            f"{', short_suffix=true' if suffix else ''}): drop those kinds"
            f"{' or set data.synthetic.short_suffix=false' if suffix else ''}, or extend a tiny model's vocabulary with `python -m dllava.model.tiny --extend <dir> --out <new dir>`"
        )


def ensure_synthetic(out: str, **spec: Any) -> dict[str, Any]:
    """Generate the synthetic task into ``out`` unless a matching generation is already there.

    A generation with other settings is never overwritten silently: the error says what differs. Runs
    started together on a fresh checkout (a sparse run and its dense twin, a parallel sweep) take an
    exclusive lock on ``out/.generate.lock``: one generates, the others wait and then use its shards.
    """
    import fcntl

    from dllava.data import synthetic

    info = synthetic.read_info(out)
    if info is None:  # (a complete generation is only read: its directory may be read-only)
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / ".generate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            info = synthetic.read_info(out)  # another run may have generated it meanwhile
            if info is None:
                return synthetic.generate(out, **spec)
    return _check_generation(out, info, spec)


def _check_generation(out: str, info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from dllava.data import synthetic

    expected = {k: v for k, v in spec.items() if k not in ("workers",)}
    found = {
        "train": info["splits"]["train"]["records"],
        "val": info["splits"]["val"]["records"],
        "test": info["splits"]["test"]["records"],
        **{k: info.get(k) for k in expected if k not in ("train", "val", "test")},
    }
    if "kinds" in expected:  # info.json lists them in canonical order
        expected["kinds"] = list(synthetic.check_kinds(expected["kinds"]))
    # info.json names short_suffix only when it is on; a spec without it generates without the suffix
    expected["short_suffix"] = bool(expected.get("short_suffix", False))
    found["short_suffix"] = synthetic.generation_short_suffix(info)
    differs = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: on disk {a}, configured {b}" for k, (a, b) in differs.items())
        raise ValueError(
            f"data.synthetic: {out} holds a different generation ({detail}). Delete it to regenerate, "
            "or set data.synthetic.out to another directory."
        )
    return info
