"""Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMA profiles tracked during training
(:mod:`trainer.phema.averages`), their snapshots (:mod:`trainer.phema.snapshots`), the profile math
(:mod:`trainer.phema.profiles`) and the reconstruction of any EMA length from the snapshots, on any number
of ranks (:mod:`trainer.phema.reconstruct`; ``python -m trainer.phema reconstruct RUN_DIR ...``)."""

from trainer.phema.averages import PowerEMA
from trainer.phema.snapshots import SnapshotWriter, disk_cost_line, snapshot_interval

__all__ = ["PowerEMA", "SnapshotWriter", "disk_cost_line", "snapshot_interval"]
