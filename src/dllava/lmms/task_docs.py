"""Write the docs file of the lmms-eval task ``dllava_synthetic_vqa`` from synthetic shards.

One JSON line per single-round record whose answer is of the short kinds (colour, shape, count, "is
there"): ``question_id`` (the record id), ``question`` (as the record asks it, without ``<image>``),
``answer``, ``kind``, and ``image``, the shard's own JPEG bytes in base64, so the task's pixels are the
shards' pixels bit for bit and the task needs no network and no image folder.

Only single-round records: lmms-eval hands a model one context string per request, so the earlier
rounds a multi-round record's final question is asked after (``eval.py`` puts them in the chat
template's turns) cannot be passed the same way. ``eval.py``'s answers on the same ``question_id`` s are
the comparison (README, "lmms-eval").

    python -m dllava.lmms.task_docs --shards 'data/synthetic/test-*.tar' \\
        --out src/dllava/lmms/tasks/dllava_synthetic_vqa/dllava_synthetic_vqa.jsonl
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from dllava.data.datamodule import resolve_urls
from dllava.data.reader import shard_samples

SHORT_KINDS = ("color", "shape", "count", "exist")  # eval.py's default data.answer_kinds
IMAGE_PREFIX = "<image>\n"


def task_docs(shards: str | Sequence[str], kinds: Sequence[str] = SHORT_KINDS) -> Iterator[dict[str, Any]]:
    """The task's documents from the shards, in shard order (see the module docstring)."""
    for url in resolve_urls(shards, key="--shards", synthetic=True):
        for sample in shard_samples(url):
            record = json.loads(sample["json"])
            turns = record["conversations"]
            if len(turns) != 2 or record.get("kinds", ["?"])[-1] not in kinds:
                continue
            question = turns[0]["value"]
            if not question.startswith(IMAGE_PREFIX):
                raise ValueError(f"{url} {record['id']}: the question does not start with <image>\\n: {question[:40]!r}")
            yield {
                "question_id": record["id"],
                "question": question[len(IMAGE_PREFIX):],
                "answer": turns[1]["value"],
                "kind": record["kinds"][-1],
                "image": base64.b64encode(sample["jpg"]).decode("ascii"),
            }


def write_task_docs(shards: str | Sequence[str], out: str | Path, kinds: Sequence[str] = SHORT_KINDS) -> int:
    """Write the docs JSONL to ``out``; returns how many documents it holds (refuses none)."""
    docs = list(task_docs(shards, kinds))
    if not docs:
        raise ValueError(f"no single-round record of kinds {list(kinds)} in {shards}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return len(docs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="the synthetic test split, e.g. 'data/synthetic/test-*.tar'")
    parser.add_argument("--out", required=True, help="the docs JSONL to write")
    parser.add_argument("--kinds", default=",".join(SHORT_KINDS), help="final-answer kinds to keep")
    args = parser.parse_args(argv)
    count = write_task_docs(args.shards, args.out, args.kinds.split(","))
    print(f"wrote {count} documents to {args.out}")


if __name__ == "__main__":
    main()
