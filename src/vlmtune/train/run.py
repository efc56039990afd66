"""What a run is while it trains: the state every stage shares, one stage's training set-up, and the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader

from vlmtune.config.schema import Config
from vlmtune.config.stages import Stage
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.sampler import EpochSampler
from vlmtune.model.groups import GroupMap
from vlmtune.model.tuning import GroupPlan
from vlmtune.tracking import MetricsLog
from vlmtune.train.resume import Progress
from vlmtune.train.vision_cache import ImageKeys, VisionCache


@dataclass
class RunResult:
    """What a run produced."""

    output_dir: Path
    final_dir: Path
    steps: int
    first_eval_loss: float | None
    last_eval_loss: float | None
    last_loss: float | None
    stage_dirs: list[Path] = field(default_factory=list)


@dataclass
class Run:
    """What every stage of a run shares."""

    cfg: Config
    accelerator: object
    out: Path
    processor: object
    gmap: GroupMap
    metrics: MetricsLog
    progress: Progress
    objective: object  # the current stage's method: the loss of a batch (vlmtune.train.objectives)
    trained_params: set[str]  # parameters any stage trains: the weights a resume state holds
    n_stages: int = 1
    last_checkpoint: Path | None = None
    first_eval: float | None = None
    last_eval: float | None = None
    last_loss: float | None = None
    cache: VisionCache | None = None  # frozen vision-tower features on disk, when valid for the run
    image_keys: ImageKeys | None = None  # the cache's keys of image files (with the cache)
    share_rows: bool = False  # rows of one sample (a pair, a group) encode its images once
    method: str = ""  # the method of the stage trained last (a stage of another method evaluates before it trains)
    initial: dict = field(default_factory=dict)  # PiSSA/OLoRA adapters' initial weights (saved converted)


@dataclass
class StageRun:
    """One stage's training set-up: its plan, data, optimizer and schedule."""

    stage: Stage
    plans: list[GroupPlan]  # each component group's mode, modules and rate in this stage
    model: object  # prepared by accelerate (DDP-wrapped with several processes)
    loader: DataLoader  # prepared by accelerate
    sampler: EpochSampler  # the training order (the prepared loader wraps it; resume sets its start)
    train_ds: VLMDataset
    eval_loader: DataLoader | None
    eval_ds: VLMDataset | None
    param_groups: list[dict]  # the optimizer's parameter groups, one per (component group, decay)
    optimizer: object
    scheduler: object
    total: int  # optimizer steps in this stage
    before: dict  # per trained tensor: (sum, sum of squares, size) at the stage's start
    flow_checked: bool = False  # the first step's gradient-flow check is done (or switched off)

    @property
    def trainable(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]
