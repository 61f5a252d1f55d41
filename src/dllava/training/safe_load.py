"""Load checkpoints without executing code, and refuse damaged ones before anything is restored.

Two kinds of checkpoint reach ``ckpt_path=``:

* **A file** (``torch.save``; one process, DDP, full-state FSDP): a zip archive whose members each
  carry a CRC32 that torch's writer computes (``torch.serialization.get_crc32_options()``, on by
  default) but its reader never checks, so a flipped bit loaded silently. :func:`verify_archive`
  checks every member's CRC first (one extra read of the file); :func:`load_checkpoint_file` then
  unpickles with ``torch.load(weights_only=True)``, and a refusal names the global instead of passing
  on torch's advice to retry with ``weights_only=False`` (which would run the file's code).
* **A sharded directory** (torch distributed checkpoint, DCP: FSDP/FSDP2): ``.metadata`` is a plain
  pickle that torch's ``FileSystemReader`` loads with ``pickle.load`` (any code runs), and the
  non-tensor items of the ``.distcp`` files (optimizer hyper-parameters, ...) are each a ``torch.save``
  archive that torch's default load planner unpickles with ``weights_only=False``. Tensor items are
  already read weights-only. :class:`SafeFileSystemReader`, passed to ``dcp.load``, reads
  ``.metadata`` with :class:`_MetadataUnpickler` (an allowlist: the DCP metadata classes and the few
  torch/builtin types they hold) and unpickles every non-tensor item weights-only before the planner
  sees it (re-serialised, so the planner's own ``torch.load`` only ever reads what we wrote).
  :func:`verify_sharded_checkpoint` performs the same reads as a dry run: before :func:`load_sharded`
  (its error is plain, where DCP would bury a reader's exception), and alone for a loader that cannot be
  given a reader (Lightning's FSDP1 strategy). DCP stores no checksum of its own; each item is a
  torch archive with per-member CRC32s: the dry run checks those of the non-tensor items (tensor
  items are not checked: that would be a second full read of the checkpoint).

Anything refused raises :class:`UnsafeCheckpointError` naming the file and the refused global.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, StorageMeta

_DCP = "torch.distributed.checkpoint.metadata"
# What torch writes into ``.metadata`` (measured on torch 2.13: dcp.save of model and optimizer states)
_METADATA_GLOBALS = frozenset(
    {(_DCP, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                               "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                               "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    # storage_meta.checkpoint_id is the path the checkpoint was saved to
    | {(module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "PurePosixPath")}
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds something whose loading could run code; it was not loaded."""


class CorruptCheckpointError(ValueError):
    """A checkpoint's bytes differ from what was written (CRC32 mismatch), or it is no torch archive."""


class NotAnArchiveError(CorruptCheckpointError):
    """The file is not a zip archive at all: not a checkpoint written by torch.save."""


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_METADATA_GLOBALS` and torch dtypes."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _is_allowed(module, name):
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load the global {module}.{name}: a distributed checkpoint's metadata "
                "holds only torch.distributed.checkpoint metadata types, and loading anything else could run code. "
                "This is not a checkpoint written by dllava (crafted or foreign); it was not loaded."
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source}: refused: persistent ids do not occur in checkpoint metadata")


def read_dcp_metadata(stream: Any, source: str | Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` stream through the allowlist; ``source`` names the file in errors."""
    try:
        metadata = _MetadataUnpickler(stream, str(source)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated or garbled pickle
        raise CorruptCheckpointError(f"{source}: unreadable distributed checkpoint metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source}: holds a {type(metadata).__name__}, not distributed checkpoint metadata")
    return metadata


def _refused_global(err: Exception) -> str:
    """The reason in torch's weights-only error, without its advice to retry with weights_only=False."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(\S.*?)(?:\s*Please use|\n\n|$)", text, re.DOTALL)
    if found:
        return found.group(1).strip().rstrip(".")
    paragraphs = [part.strip() for part in text.split("\n\n")]
    reasons = [part for part in paragraphs if part and "weights_only" not in part and not part.startswith("Check the documentation")]
    return reasons[0].rstrip(".") if reasons else "a global outside the allowlist"


def load_weights_only(source: Any, name: str, **kwargs: Any) -> Any:
    """``torch.load(source, weights_only=True)``; a refusal says what and where, never to drop weights_only."""
    try:
        return torch.load(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{name}: refused to load ({_refused_global(err)}): it holds objects outside torch's weights-only "
            "allowlist, and loading them could run code. dllava checkpoints hold only tensors and plain values."
        ) from None


def verify_archive(path: str | Path) -> None:
    """Check the CRC32 of every member of the torch archive at ``path`` (reads the whole file once)."""
    _check_crcs(path, str(path))


def _check_crcs(source: Any, name: str) -> None:
    """Every member's CRC32 of the torch archive ``source`` (a path or a file object), errors naming ``name``."""
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise NotAnArchiveError(f"{name} is not a torch checkpoint archive ({err})") from None
    if bad is not None:
        raise CorruptCheckpointError(
            f"{name} is damaged: archive member {bad!r} fails its CRC32 check (its bytes changed after it was "
            "written: a disk, copy or transfer error). Use another checkpoint (an earlier step_*.ckpt) or copy it again."
        )


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """A checkpoint file, verified (:func:`verify_archive`) and unpickled weights-only."""
    verify_archive(path)
    return load_weights_only(path, str(path), map_location=map_location)


class _WeightsOnlyBytes:
    """Stands in for a DCP load planner: non-tensor items are unpickled weights-only before the planner
    (whose ``load_bytes`` calls ``torch.load(weights_only=False)``) gets them, re-serialised by us."""

    def __init__(self, planner: Any, describe: Callable[[Any], str]) -> None:
        self._planner = planner
        self._describe = describe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        value = _checked_bytes(value, self._describe(read_item))
        self._planner.load_bytes(read_item, value)


def _checked_bytes(value: io.BytesIO, name: str) -> io.BytesIO:
    """A non-tensor DCP item, CRC-checked and unpickled weights-only, then written again by torch.save."""
    _check_crcs(value, name)
    value.seek(0)
    obj = load_weights_only(value, name, map_location="cpu")
    clean = io.BytesIO()
    torch.save(obj, clean)
    clean.seek(0)
    return clean


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` that executes no code from the checkpoint (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_dcp_metadata(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _WeightsOnlyBytes(planner, self._describe))

    def _describe(self, read_item: Any) -> str:
        info = self.storage_data[read_item.storage_index]
        return f"{Path(self.path) / info.relative_path} (item {read_item.dest_index.fqn!r})"


def load_sharded(state: dict[str, Any], path: str | Path) -> None:
    """``dcp.load`` of ``state`` (in place) from the sharded checkpoint ``path`` through :class:`SafeFileSystemReader`.

    Call :func:`verify_sharded_checkpoint` once first: DCP turns a reader's exception into a fallback
    and a ``CheckpointException`` that buries the message; the dry run raises it plainly.
    """
    from torch.distributed.checkpoint import load

    load(state, storage_reader=SafeFileSystemReader(path))


def verify_sharded_checkpoint(path: str | Path) -> Metadata:
    """Dry run of what :class:`SafeFileSystemReader` refuses: the metadata through the allowlist, and
    every non-tensor item CRC-checked and unpickled weights-only (tensor items: torch reads them
    weights-only). For loaders that build their own reader; returns the metadata."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CorruptCheckpointError(f"{path} is a directory without .metadata: not a sharded (distributed) checkpoint")
    with open(path / ".metadata", "rb") as stream:
        metadata = read_dcp_metadata(stream, path / ".metadata")
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = metadata.storage_data[MetadataIndex(fqn)]
        with open(path / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            _checked_bytes(io.BytesIO(handle.read(info.length)), f"{path / info.relative_path} (item {fqn!r})")
    return metadata


def read_sharded_full(path: str | Path) -> dict[str, Any]:
    """A whole sharded checkpoint gathered into one nested state dict in this process (no process group),
    as torch's ``dcp_to_torch_save`` gathers it, but through :class:`SafeFileSystemReader`."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    verify_sharded_checkpoint(path)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeFileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
