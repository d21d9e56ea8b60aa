"""Optional TensorBoard logging beside ``metrics.jsonl``.

``metrics.jsonl`` is always written (it is what resume, plots and sweeps read). With
``LoopConfig(log="tensorboard")`` every record also goes to TensorBoard event files under
``<run>/tensorboard/``, through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package:
``pip install purepeft[log]``). Scalars are named ``<kind>/<field>``, e.g. ``train/loss``,
``train/grad_norm``, ``eval/accuracy``, at the record's optimizer step.
"""
from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Optional

__all__ = ["TensorBoardLog", "open_board"]


class TensorBoardLog:
    """Writes the numeric fields of metrics records as TensorBoard scalars."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's module imports the tensorboard package
            raise RuntimeError("log='tensorboard' needs the tensorboard package: "
                               "pip install tensorboard (or purepeft[log])") from e
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict) -> None:
        kind, step = record.get("kind", "train"), int(record["step"])
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(run_dir: Path, log: str) -> Optional[TensorBoardLog]:
    """A TensorBoard writer for ``log == "tensorboard"``, else None."""
    if log != "tensorboard":
        return None
    return TensorBoardLog(Path(run_dir) / "tensorboard")
