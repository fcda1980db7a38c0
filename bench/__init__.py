"""dermaflow's benchmark suite: the project's real code paths against their limits.

Each part times what the pipeline actually runs (``tasks.train.train_one_epoch`` over the
prepared cache, ``tasks.cams.explain_batch``, the exported ONNX graph, the DVC stages) next to
a reference that bounds it (a bare loop on tensors already on the device, the bare
forward+backward rate, pytorch-grad-cam used per image, PyTorch eager), so every number comes
with a ratio and a target verdict rather than standing alone.

Run it with ``python -m bench`` or ``dermaflow bench`` (see ``bench/README.md``).
"""

from __future__ import annotations

PARTS = ("training", "data", "explain", "inference", "pipeline", "ddp")
DEFAULT_PARTS = ("training", "data", "explain", "inference")

__all__ = ["DEFAULT_PARTS", "PARTS"]
