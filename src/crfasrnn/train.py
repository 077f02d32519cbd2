"""Training FCN-8s and CRF-RNN: piecewise (FCN first, then the CRF) and end-to-end, on one or many processes.

Stages:

* ``fcn``: FCN-8s alone (cross-entropy on its logits).
* ``crf``: CRF-RNN with the backbone frozen (dropout off): only the CRF's kernel weights and compatibility learn.
* ``joint``: CRF-RNN end to end: backbone and CRF together.

``crf`` and ``joint`` start from an FCN (``init``: a ``fcn`` checkpoint or any weights file). The loss is
cross-entropy averaged over the non-ignored pixels (255 = ignore) of the global batch — over all processes, so that
N processes give the same gradients as one process with an N times larger batch.

Optimizer: SGD with momentum and weight decay, with Caffe's parameter groups: weights ×1, biases ×2 lr and no decay;
the fixed bilinear ``upscore8`` is frozen (lr_mult 0 in the references); the CRF's kernel weights and compatibility
get their own multipliers (see :class:`TrainConfig`). Schedules: ``poly`` (lr · (1 − step/total)^power, per step) or
``step`` (× gamma every ``step_size`` epochs), optionally after a linear warm-up over ``warmup_steps`` steps;
optional gradient-norm clipping.

Outputs in ``out``: ``last.pt`` (the checkpoint, atomically replaced every epoch and every ``checkpoint_every``
steps), ``metrics.jsonl`` (one JSON record per logged step and per epoch), ``curves.png`` (loss and validation mIoU
per epoch), ``config.json``, and for stages ``crf`` / ``joint`` at the end ``model.safetensors`` (the trained CRF-RNN
in the package's weights format, with its class names: ``crfasrnn segment --weights`` and ``evaluate --weights``
read it).

Higher-order potentials (Arnab et al., ECCV 2016; stages ``crf`` and ``joint``): ``detections`` (a folder of
``<sample id>.json`` files) and ``superpixels`` (SLIC segment counts) give the CRF its detection and superpixel
potentials; each sample brings its detections, transformed with it, and its superpixels, made on the transformed image
(:class:`~crfasrnn.data.higher_order.HigherOrderDataset`); the potentials' weights form their own parameter group
(``crf_lr_mult_higher_order``), and ``model.safetensors`` records the settings under ``higher_order``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as dist_utils
from .checkpoint import atomic_write_bytes, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import EvalTransform, SegmentationDataset, TrainTransform, open_dataset, preprocess_batch
from .data.datasets import IGNORE_INDEX
from .data.higher_order import HigherOrderDataset, collate_higher_order
from .errors import MissingDependencyError, TrainingDivergedError
from .evaluate import SegmentationMetrics, model_confusion, segmentation_metrics
from .files import remove_orphans
from .higher_order import Detections, Superpixels
from .initialise import he_initialise, initialise_from_file
from .losses import dense_crf_loss
from .models import CrfRnnNet, FCN8s
from .weights import state_dict_for

__all__ = ["TrainConfig", "TrainResult", "train", "parameter_groups", "build_model", "lr_lambda", "STAGES"]

logger = logging.getLogger(__name__)

STAGES = ("fcn", "crf", "joint")
CHECKPOINT_NAME = "last.pt"
DEFAULT_LR = {"fcn": 1e-3, "crf": 1e-5, "joint": 1e-5}
Dataset_ = SegmentationDataset | HigherOrderDataset  # a training or validation set


@dataclass
class TrainConfig:
    """Options of :func:`train` (the CLI's ``crfasrnn train`` flags and ``--config`` TOML keys have the same names).

    Learning rates (measured on the generated data of the tests; the paper's recipe, not its numbers). The
    reference (Caffe) trained with an *unnormalised* loss (summed over the ~250 000 pixels of a 500×500 image),
    ``base_lr`` 1e-13, momentum 0.99, and multipliers ×10000 (kernel weights) and ×1000 (compatibility): per
    pixel-averaged loss, a backbone rate of ~2.5e-8 (the backbone barely moves) and a kernel rate of ~2.5e-4. Here the
    loss is the mean over pixels, so rates are of the usual size: ``lr`` defaults to 1e-3 for stage ``fcn`` and 1e-5
    for ``crf`` / ``joint`` (1e-4 already undid much of the FCN's training in the first joint epoch). The CRF's
    parameters are O(1) (W = 3·I, 5·I, M = −I) and learn stably with steps of ~1e-2 (1e-1 still fine; 1 lowered
    validation mIoU), hence the default multipliers ×1000 (kernels) and ×100 (compatibility) on 1e-5: ten times
    below the original ratios, which with a mean-reduced loss and a useful base rate would move the CRF by whole
    units per step. The original ratios can be given explicitly. CRF parameters get no weight decay by default
    (decay pulls the kernel weights and the Potts compatibility towards 0, i.e. switches the CRF off, and is multiplied
    by the large rate multipliers).
    """

    data: str = ""
    out: str = ""
    stage: str = "fcn"
    epochs: int = 10
    batch_size: int = 4
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"
    poly_power: float = 0.9
    step_size: int = 10
    gamma: float = 0.1
    warmup_steps: int = 0
    clip_grad_norm: float | None = None
    crf_lr_mult_kernel: float = 1000.0
    crf_lr_mult_compat: float = 100.0
    crf_weight_decay: float = 0.0
    num_iterations_train: int = 5
    num_iterations_test: int = 10
    # weakly supervised training: partial cross-entropy on the labelled pixels + the dense-CRF loss (crfasrnn.losses);
    # 0 switches it off; the paper's settings: weight 2e-9, sigma_rgb 15, sigma_xy 100, scale 0.5
    crf_loss_weight: float = 0.0
    crf_loss_sigma_rgb: float = 15.0
    crf_loss_sigma_xy: float = 100.0
    crf_loss_scale: float = 0.5
    crf_loss_normalized: bool = False  # the normalised affinity D^-1/2 W D^-1/2 instead of W
    crf_loss_start_epoch: int = 0  # the loss is added from this epoch on (rloss fine-tunes a partial-CE network)
    # higher-order potentials (Arnab et al., ECCV 2016; stages crf / joint): a folder of <sample id>.json detection
    # files (both splits), SLIC segment counts (one superpixel scale each), the superpixel form, the potentials'
    # learning-rate multiplier, and their weights' starting value (None: the layer's, w_x = w_y = 1, 0.5 per scale)
    detections: str | None = None
    superpixels: list[int] | None = None
    superpixel_potential: str = "mean"
    crf_lr_mult_higher_order: float = 1000.0
    higher_order_init: float | None = None
    init: str | None = None
    resume: bool = False
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    width: float = 1.0
    num_classes: int | None = None
    class_names: list[str] | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    crop_size: int = 320
    scale_min: float = 0.5
    scale_max: float = 1.5
    hflip: bool = True
    dropout: float | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    max_steps: int | None = None

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if not self.data or not self.out:
            raise ValueError("both data and out folders must be given")
        if self.schedule not in ("poly", "step"):
            raise ValueError(f"schedule must be 'poly' or 'step', got {self.schedule!r}")
        for name in ("epochs", "batch_size", "crop_size", "step_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_iterations_train", "num_iterations_test", "workers", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.crf_loss_weight) and self.crf_loss_weight >= 0):
            raise ValueError(f"crf_loss_weight must be a finite number >= 0, got {self.crf_loss_weight}")
        for name in ("crf_loss_sigma_rgb", "crf_loss_sigma_xy"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.crf_loss_start_epoch < 0:
            raise ValueError(f"crf_loss_start_epoch must be >= 0, got {self.crf_loss_start_epoch}")
        if not 0 < self.crf_loss_scale <= 1:
            raise ValueError(f"crf_loss_scale must lie in (0, 1], got {self.crf_loss_scale}")
        self._validate_higher_order()
        if self.lr is None:
            self.lr = DEFAULT_LR[self.stage]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.stage != "fcn" and self.init is None and not self.resume:
            logger.warning("stage %s without init: the FCN starts from scratch (train stage fcn first)", self.stage)

    def _validate_higher_order(self) -> None:
        if self.superpixels is not None:
            counts = list(self.superpixels)
            if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
                raise ValueError(f"superpixels must be segment counts >= 1, e.g. [100, 200], got {self.superpixels!r}")
            self.superpixels = counts
        if self.superpixel_potential not in ("mean", "potts"):
            raise ValueError(f"superpixel_potential must be 'mean' or 'potts', got {self.superpixel_potential!r}")
        if self.higher_order and self.stage == "fcn":
            raise ValueError("detections and superpixels are CRF inputs: they need stage crf or joint, not fcn")
        if self.detections is not None and not Path(self.detections).is_dir():
            raise FileNotFoundError(f"detections folder not found: {self.detections}")
        if self.higher_order_init is not None and not math.isfinite(self.higher_order_init):
            raise ValueError(f"higher_order_init must be a finite number, got {self.higher_order_init}")
        if not (math.isfinite(self.crf_lr_mult_higher_order) and self.crf_lr_mult_higher_order >= 0):
            raise ValueError(f"crf_lr_mult_higher_order must be >= 0, got {self.crf_lr_mult_higher_order}")

    @property
    def higher_order(self) -> bool:
        """Whether the CRF has higher-order potentials (detections or superpixels)."""
        return self.detections is not None or bool(self.superpixels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process)."""

    checkpoint: Path
    epochs: int
    steps: int
    final_loss: float
    val: dict[str, SegmentationMetrics]
    records: list[dict]


def build_model(
    stage: str,
    num_classes: int,
    *,
    width: float,
    num_iterations: int,
    detections: bool = False,
    superpixel_scales: int = 0,
    superpixel_potential: str = "mean",
) -> FCN8s | CrfRnnNet:
    """FCN-8s for stage ``fcn``; CRF-RNN with ``num_iterations`` mean-field steps for ``crf`` / ``joint``, with the
    higher-order potentials asked for (a detection potential, ``superpixel_scales`` superpixel scales)."""
    if stage == "fcn":
        return FCN8s(num_classes, width=width)
    options: dict[str, Any] = {}
    if detections or superpixel_scales:
        options = {
            "detections": detections,
            "superpixel_scales": superpixel_scales,
            "superpixel_potential": superpixel_potential,
        }
    return CrfRnnNet(num_classes, num_iterations, width=width, **options)


def parameter_groups(model: FCN8s | CrfRnnNet, config: TrainConfig) -> list[dict[str, Any]]:
    """SGD parameter groups with their lr / weight-decay multipliers (see the module docstring).

    Each group carries ``name`` and ``lr_mult``; the scheduler scales ``lr_mult · lr``. Parameters that must not learn
    get ``requires_grad = False`` (FCN-8s's ``upscore8`` always; the backbone in stage ``crf``). A CrfRnnNet's CRF
    parameters are its ``crf.*``, the rest its backbone's.
    """
    lr, wd = config.lr, config.weight_decay
    fcn = model.backbone if isinstance(model, CrfRnnNet) else model
    upscore8 = getattr(fcn, "upscore8", None)  # the fixed bilinear upsampling of FCN-8s
    frozen = () if upscore8 is None else (upscore8.weight,)
    for param in frozen:
        param.requires_grad_(False)
    train_backbone = config.stage != "crf"
    groups: dict[str, dict[str, Any]] = {
        "weights": {"params": [], "lr_mult": 1.0, "weight_decay": wd},
        "biases": {"params": [], "lr_mult": 2.0, "weight_decay": 0.0},
        "crf_kernels": {"params": [], "lr_mult": config.crf_lr_mult_kernel, "weight_decay": config.crf_weight_decay},
        "crf_compat": {"params": [], "lr_mult": config.crf_lr_mult_compat, "weight_decay": config.crf_weight_decay},
        "crf_higher_order": {
            "params": [],
            "lr_mult": config.crf_lr_mult_higher_order,
            "weight_decay": config.crf_weight_decay,
        },
    }
    for name, param in model.named_parameters():
        if any(param is p for p in frozen):
            continue
        if isinstance(model, CrfRnnNet) and name.startswith("crf.higher_order."):
            groups["crf_higher_order"]["params"].append(param)
        elif isinstance(model, CrfRnnNet) and name.startswith("crf."):
            groups["crf_compat" if name.endswith("compatibility") else "crf_kernels"]["params"].append(param)
        elif not train_backbone:
            param.requires_grad_(False)
        else:
            groups["biases" if name.endswith("bias") else "weights"]["params"].append(param)
    out = []
    for name, group in groups.items():
        if group["params"]:
            out.append({**group, "name": name, "lr": lr * group["lr_mult"]})
    return out


def lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule's factor for optimizer step ``step`` (0-based)."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if config.schedule == "poly":
            value = max(0.0, 1.0 - step / total) ** config.poly_power
        else:
            value = config.gamma ** ((step // steps_per_epoch) // config.step_size)
        return value * min(1.0, (step + 1) / warmup) if warmup else value

    return factor


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p


def _train_mode(model: FCN8s | CrfRnnNet, stage: str) -> None:
    model.train()
    if stage == "crf":  # frozen backbone: the CRF learns on the unaries it will see at test time
        (model.backbone if isinstance(model, CrfRnnNet) else model).eval()


PADDING_LABEL = -1
"""Label of the padded pixels of a training crop when the dense-CRF loss is on (its region of interest excludes them,
as rloss's ``croppings`` do); the step turns them into 255 for the cross-entropy."""


def _load_datasets(config: TrainConfig) -> tuple[Dataset_, Dataset_ | None]:
    transform = TrainTransform(
        config.crop_size,
        scale_range=(config.scale_min, config.scale_max),
        hflip=config.hflip,
        pad_label=PADDING_LABEL if config.crf_loss_weight > 0 else IGNORE_INDEX,
    )
    train_set = open_dataset(
        config.data,
        config.train_split,
        num_classes=config.num_classes,
        class_names=config.class_names,
        transform=transform,
        seed=config.seed,
    )
    val_set = None
    if config.val_split:
        val_set = open_dataset(
            config.data,
            config.val_split,
            num_classes=train_set.num_classes,
            class_names=train_set.class_names,
            transform=EvalTransform(),
        )
    if config.higher_order:  # each sample with its detections and superpixels

        def with_inputs(dataset: SegmentationDataset) -> HigherOrderDataset:
            return HigherOrderDataset(dataset, detections=config.detections, superpixels=config.superpixels or ())

        return with_inputs(train_set), None if val_set is None else with_inputs(val_set)
    return train_set, val_set


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the non-ignored pixels and their count."""
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def validate(
    model: FCN8s | CrfRnnNet,
    dataset: Dataset_,
    *,
    device: torch.device,
    num_iterations: int,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, SegmentationMetrics]:
    """Full-size evaluation on this process's share of ``dataset``, confusion matrices summed over processes."""
    indices = dist_utils.shard_indices(len(dataset), rank, world_size)
    matrices = model_confusion(model, dataset, device=device, num_iterations=num_iterations, indices=indices)
    result = {}
    for head, matrix in matrices.items():
        dist_utils.all_reduce_sum(matrix)
        result[head] = segmentation_metrics(matrix, dataset.class_names)
    return result


def _write_records(path: Path, records: list[dict]) -> None:
    atomic_write_bytes("".join(json.dumps(r) + "\n" for r in records).encode(), path)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(records: list[dict], path: Path) -> None:
    try:
        from .plots import plot_curves

        plot_curves(records, path)
    except MissingDependencyError as exc:  # matplotlib missing
        logger.warning("no %s: %s", path.name, exc)


class _ProgressBar(Protocol):
    """What :func:`train` uses of a progress bar (``tqdm.tqdm`` has it)."""

    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> Any: ...


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def train(
    config: TrainConfig,
    *,
    progress: Callable[..., Any] | None = None,
) -> TrainResult:
    """Train as ``config`` says; see the module docstring. Call once per process (``torchrun`` sets the rank).

    Args:
        config: the options.
        progress: ``progress(total=..., initial=..., desc=...)`` returning a bar with ``update``, ``set_postfix`` and
            ``close`` (e.g. ``tqdm.tqdm``); used on rank 0 only.
    """
    config.validate()
    info, device = dist_utils.setup(config.device)
    try:
        result = _train(config, info, device, progress)
    except BaseException:
        dist_utils.teardown(wait=False)
        raise
    dist_utils.teardown()
    return result


def _batches(loader: DataLoader) -> Iterator[tuple[Any, ...]]:
    """Iterate ``loader``; an error in a worker process comes back as the original one-line error."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (ValueError, OSError) as exc:
            message = str(exc)
            if "Original Traceback" in message:  # DataLoader's wrapping of a worker's exception
                last = message.strip().splitlines()[-1]
                message = last.split(": ", 1)[1] if ": " in last else last
                raise type(exc)(message) from None
            raise
        yield batch


@dataclass
class _Run:
    """One training run's state on this process: what it trains and with what, and how far it has got."""

    config: TrainConfig
    info: dist_utils.DistInfo
    device: torch.device
    train_set: Dataset_
    val_set: Dataset_ | None
    model: FCN8s | CrfRnnNet
    ddp_model: nn.Module  # ``model`` itself in a single process
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: dist_utils.ShardSampler
    epoch_sum: torch.Tensor  # (summed loss, pixels) of the current epoch, over all processes
    step: int = 0  # optimizer steps taken
    records: list[dict[str, Any]] = field(default_factory=list)
    loss_value: float = float("nan")  # the last step's loss
    crf_loss_value: float | None = None  # the last step's dense-CRF loss (weakly supervised training), else None
    val: dict[str, SegmentationMetrics] = field(default_factory=dict)  # the last validation

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def records_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def last_step(self) -> int:
        """Where this run stops: the end of the last epoch, or ``max_steps`` before it."""
        max_steps = self.config.max_steps
        return min(self.total_steps, max_steps) if max_steps is not None else self.total_steps


@dataclass
class _Throughput:
    """Images per second (over all processes) since the start of an epoch's steps."""

    started: float = field(default_factory=time.perf_counter)
    seen: int = 0

    def rate(self) -> float:
        return self.seen / max(time.perf_counter() - self.started, 1e-9)


def _train(
    config: TrainConfig, info: dist_utils.DistInfo, device: torch.device, progress: Callable[..., Any] | None
) -> TrainResult:
    """:func:`train` once the process group is up: set up, run the epochs, write the final weights, report."""
    run = _setup(config, info, device)
    _prepare_out(run)
    logger.info(
        "stage %s: %d training samples, %d steps per epoch (batch %d x %d processes), %d epochs, device %s",
        config.stage, len(run.train_set), run.steps_per_epoch, config.batch_size, info.world_size, config.epochs,
        device,
    )  # fmt: skip
    bar = _progress_bar(run, progress)
    try:
        while run.step < run.last_step:
            throughput = _run_epoch(run, bar)
            if run.step % run.steps_per_epoch == 0:  # a completed epoch
                _finish_epoch(run, throughput)
            elif run.step == run.last_step:  # stopped by max_steps inside an epoch
                _checkpoint(run)
    finally:
        bar.close()
    _save_final_weights(run)
    return _result(run)


def _setup(config: TrainConfig, info: dist_utils.DistInfo, device: torch.device) -> _Run:
    """Datasets, model, optimizer, schedule and sampler; the state of the run resumed, if ``config.resume``."""
    train_set, val_set = _load_datasets(config)
    torch.manual_seed(config.seed)
    model = build_model(
        config.stage,
        train_set.num_classes,
        width=config.width,
        num_iterations=config.num_iterations_train,
        detections=config.detections is not None,
        superpixel_scales=len(config.superpixels or ()),
        superpixel_potential=config.superpixel_potential,
    )
    checkpoint_path = Path(config.out) / CHECKPOINT_NAME
    checkpoint = _resume_checkpoint(checkpoint_path, config, info) if config.resume else None
    _initialise_model(model, config, checkpoint)
    model.to(device)
    optimizer = _optimizer(model, config)
    sampler = dist_utils.ShardSampler(
        len(train_set), batch_size=config.batch_size, rank=info.rank, world_size=info.world_size, seed=config.seed
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, sampler.steps_per_epoch))
    run = _Run(
        config=config,
        info=info,
        device=device,
        train_set=train_set,
        val_set=val_set,
        model=model,
        ddp_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        epoch_sum=torch.zeros(2, dtype=torch.float64, device=device),
    )
    if checkpoint is not None:
        _restore(run, checkpoint)
    else:
        torch.manual_seed(config.seed + info.rank)  # dropout masks differ between processes, like their data
    if info.enabled:
        # a process whose batch has no detection leaves the detection weights out of its graph
        run.ddp_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.detections is not None,
        )
    return run


def _resume_checkpoint(path: Path, config: TrainConfig, info: dist_utils.DistInfo) -> dict[str, Any]:
    """``last.pt`` to resume from, after checking it was written by a run that ``config`` continues."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    checkpoint = load_checkpoint(path)
    saved = checkpoint["args"]
    for key in ("stage", "width", "batch_size", "epochs", "seed", "train_split", "crop_size", "superpixels"):
        if saved.get(key) != getattr(config, key):
            raise ValueError(
                f"--resume: {path} was written with {key}={saved.get(key)!r}, now {getattr(config, key)!r}"
            )
    if checkpoint.get("world_size", 1) != info.world_size:
        raise ValueError(
            f"--resume: {path} was written by {checkpoint.get('world_size', 1)} processes, now "
            f"{info.world_size}: the order of the samples would change"
        )
    return checkpoint


def _initialise_model(model: FCN8s | CrfRnnNet, config: TrainConfig, checkpoint: dict[str, Any] | None) -> None:
    """The model's starting weights (the checkpoint resumed, ``config.init``, or He-random) and its dropout."""
    if checkpoint is not None:  # (a checkpoint of an older version may have the flat layout: state_dict_for)
        model.load_state_dict(state_dict_for(model, checkpoint["model"]))
    elif config.init:
        initialise_from_file(model, config.init)
    else:
        he_initialise(model)
        logger.info("no init file: backbone initialised randomly (He normal), score layers zero, upsampling bilinear")
    potentials = model.crf.higher_order if isinstance(model, CrfRnnNet) else None
    if checkpoint is None and config.higher_order_init is not None and potentials is not None:
        with torch.no_grad():
            for param in potentials.parameters():
                param.fill_(config.higher_order_init)
    if config.dropout is not None:
        _set_dropout(model, config.dropout)


def _optimizer(model: FCN8s | CrfRnnNet, config: TrainConfig) -> torch.optim.SGD:
    """SGD over :func:`parameter_groups`, each group at ``lr_mult · lr`` (its schedule's starting rate)."""
    lr = config.lr
    if lr is None:
        raise ValueError("TrainConfig.lr is unset: call TrainConfig.validate() first")
    optimizer = torch.optim.SGD(parameter_groups(model, config), lr=lr, momentum=config.momentum)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
        group["initial_lr"] = group["lr"]
    return optimizer


def _restore(run: _Run, checkpoint: dict[str, Any]) -> None:
    """Continue where ``checkpoint`` stopped: optimizer, schedule, step, RNG states, records, the epoch's loss."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.step = int(checkpoint["step"])
    rng = checkpoint["rng"]
    set_rng_state(rng[run.info.rank] if run.info.rank < len(rng) else rng[0])
    run.records = [r for r in _read_records(run.records_path) if r.get("step", 0) <= run.step]
    logger.info("resumed from %s at step %d (epoch %d)", run.checkpoint_path, run.step, run.step // run.steps_per_epoch)
    if run.step % run.steps_per_epoch:  # resumed inside an epoch
        run.epoch_sum += checkpoint["epoch_loss"].to(run.device)


def _prepare_out(run: _Run) -> None:
    """Rank 0: the output folder, without an earlier run's unfinished files, with ``config.json`` and the records."""
    if not run.info.is_main:
        return
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_orphans(run.checkpoint_path)  # what a kill during an earlier run's write left
    if removed:
        logger.info("removed %d unfinished checkpoint file(s) of an earlier run in %s", removed, out)
    atomic_write_bytes(json.dumps(run.config.to_dict(), indent=2).encode(), out / "config.json")
    _write_records(run.records_path, run.records)


def _progress_bar(run: _Run, progress: Callable[..., Any] | None) -> _ProgressBar:
    """Rank 0's bar from ``progress`` (none without it, and on the other ranks)."""
    if not run.info.is_main or progress is None:
        return _NoProgress()
    bar: _ProgressBar = progress(total=run.last_step, initial=run.step, desc=f"train {run.config.stage}")
    return bar


def _epoch_loader(run: _Run, epoch: int, skip: int) -> DataLoader:
    """The loader of ``epoch``'s batches after its first ``skip`` (its augmentations and order seeded by epoch)."""
    config = run.config
    run.train_set.set_epoch(epoch)
    run.sampler.set_epoch(epoch, skip_batches=skip)
    return DataLoader(
        run.train_set,
        batch_size=config.batch_size,
        collate_fn=collate_higher_order if isinstance(run.train_set, HigherOrderDataset) else None,
        sampler=run.sampler,
        num_workers=config.workers,
        drop_last=True,
        pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),
    )


def _run_epoch(run: _Run, bar: _ProgressBar) -> _Throughput:
    """Train from ``run.step`` to the end of its epoch (or to ``last_step``); returns the epoch's throughput."""
    config = run.config
    epoch = run.step // run.steps_per_epoch
    skip = run.step - epoch * run.steps_per_epoch
    loader = _epoch_loader(run, epoch, skip)
    _train_mode(run.model, config.stage)
    if skip == 0:
        run.epoch_sum.zero_()
    throughput = _Throughput()
    for images, labels, *inputs in _batches(loader):
        _train_step(run, images, labels, *inputs)
        throughput.seen += images.shape[0] * run.info.world_size  # global images: equal batches on every process
        rate = throughput.rate()
        bar.update(1)
        bar.set_postfix(loss=f"{run.loss_value:.4f}", img_s=f"{rate:.1f}", epoch=epoch + 1)
        _record_step(run, epoch)
        end_of_epoch = run.step % run.steps_per_epoch == 0
        if (config.checkpoint_every and run.step % config.checkpoint_every == 0) and not end_of_epoch:
            _checkpoint(run)
        if end_of_epoch or run.step == run.last_step:
            break
    return throughput


def _train_step(
    run: _Run,
    images: torch.Tensor,
    labels: torch.Tensor,
    detections: Detections | None = None,
    superpixels: Superpixels | None = None,
) -> None:
    """One optimizer step on a batch; adds its loss to ``run.epoch_sum`` and sets ``run.loss_value``."""
    config, device = run.config, run.device
    x = preprocess_batch(images.to(device, non_blocking=True))
    labels = labels.to(device, non_blocking=True)
    roi = None
    if config.crf_loss_weight > 0:  # the padded pixels (PADDING_LABEL): outside the loss's ROI, ignored by the CE
        inside = labels != PADDING_LABEL
        labels = labels.masked_fill(~inside, IGNORE_INDEX)
        roi = inside.float()
    if detections is not None or superpixels is not None:
        logits = run.ddp_model(
            x,
            detections=None if detections is None else detections.to(device),
            superpixels=None if superpixels is None else superpixels.to(device),
        )
    else:
        logits = run.ddp_model(x)
    loss_sum, count = _loss_sum(logits, labels)
    crf = None
    if roi is not None and run.step >= config.crf_loss_start_epoch * run.steps_per_epoch:
        # a mean over this process's images: DDP's average makes it the global mean
        crf = dense_crf_loss(
            images.to(device, torch.float32),
            torch.softmax(logits, dim=1),
            roi,
            sigma_rgb=config.crf_loss_sigma_rgb,
            sigma_xy=config.crf_loss_sigma_xy,
            scale_factor=config.crf_loss_scale,
            weight=config.crf_loss_weight,
            normalized=config.crf_loss_normalized,
        )
    # one reduction for the step: the cross-entropy's sum and count, and the dense-CRF loss where there is one
    parts = [loss_sum.detach().double(), count.double()] + ([] if crf is None else [crf.detach().double()])
    totals = torch.stack(parts)
    dist_utils.all_reduce_sum(totals)
    if totals[1] == 0:
        raise ValueError(f"step {run.step}: every pixel of the batch is ignored (255)")
    # mean over the global batch's valid pixels; DDP averages gradients over processes, hence × world
    loss = loss_sum * (run.info.world_size / totals[1].float())
    if crf is not None:
        loss = loss + crf
        run.crf_loss_value = float(totals[2]) / run.info.world_size
    loss.backward()
    if config.clip_grad_norm:
        nn.utils.clip_grad_norm_(run.model.parameters(), config.clip_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    run.epoch_sum += totals[:2]
    run.loss_value = float(totals[0] / totals[1])
    if not math.isfinite(run.loss_value):
        raise TrainingDivergedError(
            f"the loss became {run.loss_value} at step {run.step}; lower --lr or the CRF multipliers"
        )


def _record_step(run: _Run, epoch: int) -> None:
    """Append the step's record every ``log_every`` steps and at the last step."""
    if run.step % run.config.log_every == 0 or run.step == run.last_step:
        run.records.append(
            {
                "kind": "step",
                "step": run.step,
                "epoch": epoch,
                "loss": run.loss_value,
                **({} if run.crf_loss_value is None else {"crf_loss": run.crf_loss_value}),
                "lr": run.optimizer.param_groups[0]["lr"],
            }
        )


def _finish_epoch(run: _Run, throughput: _Throughput) -> None:
    """After a completed epoch: validate, append the epoch's record, checkpoint, write the records and curves."""
    record: dict[str, Any] = {
        "kind": "epoch",
        "epoch": run.step // run.steps_per_epoch,
        "step": run.step,
        "train_loss": float(run.epoch_sum[0] / run.epoch_sum[1]),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": throughput.rate(),
    }
    if run.val_set is not None:
        record.update(_validate_epoch(run, run.val_set))
        logger.info(
            "epoch %d: loss %.4f, val mIoU %.2f %%", record["epoch"], record["train_loss"], 100 * record["val_miou"]
        )
    run.records.append(record)
    _checkpoint(run, plot=True)


def _validate_epoch(run: _Run, val_set: Dataset_) -> dict[str, float]:
    """Validate the model (kept in ``run.val``); the epoch record's validation entries."""
    config, info = run.config, run.info
    run.val = validate(
        run.model, val_set, device=run.device, num_iterations=config.num_iterations_test,
        rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    main = run.val.get("crf", run.val["fcn"])
    entries = {"val_miou": main.mean_iou, "val_pixel_accuracy": main.pixel_accuracy}
    if "crf" in run.val:
        entries["val_miou_fcn"] = run.val["fcn"].mean_iou
    return entries


def _checkpoint(run: _Run, *, plot: bool = False) -> None:
    """Save ``last.pt`` (every process takes part), then on rank 0 write the records (and, if ``plot``, the curves)."""
    _save_checkpoint(run)
    if run.info.is_main:
        _write_records(run.records_path, run.records)
        if plot:
            _plot(run.records, run.out / "curves.png")


def _save_checkpoint(run: _Run) -> None:
    """Gather every process's RNG states; rank 0 writes them with the model, optimizer and schedule to ``last.pt``."""
    info = run.info
    rng: list[Any] = [rng_state()]
    if info.enabled:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    if info.is_main:
        save_checkpoint(
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "epoch": run.step // run.steps_per_epoch,
                "step": run.step,
                "epoch_loss": run.epoch_sum.cpu(),
                "world_size": info.world_size,
                "rng": rng,
                "args": run.config.to_dict(),
                "num_classes": run.train_set.num_classes,
                "class_names": run.train_set.class_names,
            },
            run.checkpoint_path,
        )


def _save_final_weights(run: _Run) -> None:
    """Rank 0, stages crf / joint, once every epoch is done: ``model.safetensors`` (test-time mean-field steps)."""
    model, config = run.model, run.config
    if not (run.info.is_main and isinstance(model, CrfRnnNet) and run.step == run.total_steps):
        return
    from .weights import save_weights

    path = run.out / "model.safetensors"
    model.crf.num_iterations = config.num_iterations_test
    save_weights(
        model,
        path,
        metadata={
            "classes": run.train_set.class_names,
            "trained_on": str(config.data),
            "stage": config.stage,
            **({"higher_order": _higher_order_metadata(config)} if config.higher_order else {}),
        },
    )
    model.crf.num_iterations = config.num_iterations_train
    logger.info("wrote %s", path)


def _higher_order_metadata(config: TrainConfig) -> dict[str, Any]:
    """What the weights file records of the potentials: whether it takes detections, its SLIC counts."""
    return {
        "detections": config.detections is not None,
        "superpixels": list(config.superpixels or ()),
        "superpixel_potential": config.superpixel_potential,
    }


def _result(run: _Run) -> TrainResult:
    """What :func:`train` returns: the checkpoint, how far training got, the last loss and validation, the records."""
    return TrainResult(
        checkpoint=run.checkpoint_path,
        epochs=run.step // run.steps_per_epoch,
        steps=run.step,
        final_loss=run.loss_value,
        val=run.val,
        records=run.records,
    )
