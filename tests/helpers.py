"""Compose the real Hydra configs in tests, with a live HydraConfig so ${hydra:...} resolves."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dllava.utils.resolvers import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
register_resolvers()


def compose(name: str, overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=name, overrides=overrides or [], return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # @hydra.main hands the task its config without the hydra node, too
    return cfg


def wandb_records(run_file: Path):
    """The protobuf records of an offline ``run-<id>.wandb`` file (W&B's LevelDB-style record log).

    W&B 0.31 no longer ships a Python reader, so this walks the log format directly: a 7-byte
    header, then 32 KiB blocks of records ``crc32(4) length(2, LE) type(1) payload``; types 2-4
    are the first, middle and last fragments of a record split across blocks.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file")
    block, pos, chunks = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind in (1, 2, 3, 4):  # type 0 is padding
            chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows (metric name -> value) of an offline W&B run file."""
    import json

    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"
    ]


def wandb_run_record(run_file: Path):
    """The run record (id, group, ...) of an offline W&B run file."""
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {run_file}")
