"""dllava in lmms-eval: the ``dllava`` model (:mod:`dllava.lmms.model`), its entry point
(:mod:`dllava.lmms.plugin`), the local task ``dllava_synthetic_vqa`` (``tasks/``, built by
:mod:`dllava.lmms.task_docs`) and a Lightning callback that runs lmms-eval after training
(:mod:`dllava.lmms.callback`).

Nothing here imports lmms-eval at package import: it is an optional extra (``pip install -e ".[lmms]"``
plus lmms-eval itself with ``--no-deps``, see the README).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # lmms-eval's --include_path for dllava's own tasks
