"""The training loop: optimizer steps, validation, checkpoints, resume and DDP.

A training is bounded by its step count (epochs x steps_per_epoch) and the learning rate follows
the steps alone (`pipeline.training.optim`), so the same params and data give the same weights on
a busy or an idle machine. `max_minutes` is an opt-in safety net: when it fires the run stops,
keeps its checkpoints and is tagged `stopped_by_time_limit` in MLflow, and `segpipe train` exits
non-zero (such a model depends on the machine's speed). A resumed run continues that budget: the
wall time of the killed run's checkpointed epochs counts.

Optimisation: Adam/AdamW or the U-Net paper's SGD with momentum 0.99; gradient-norm clipping;
the `precision` parameter (`pipeline.networks.precision`): fp32, or bf16 autocast on the CPU and on
CUDA (fp16 with a grad scaler on CUDA), with fp32 master weights and an fp32 loss; channels-last
(NHWC) weights and batches; optional `torch.compile`. The loss is the network's deep supervision over its heads
(`pipeline.training.supervision`), inside the FOV (`patches.fov_key`) when the dataset has one.

Classes: a dataset of 2 classes trains a 1-channel network (sigmoid), one of K > 2 classes a K-channel
network (softmax cross-entropy with the eq. 2 weight map, soft Dice over the foreground classes); both
checkpoints record the dataset's class names (`class_names`) and the `target` (labels, or the border
target's three classes, `PreparedDataset.with_target`).

Cross-validation: `settings.fold` (None: the prepare split) is the fold `prepared` was re-split
on (`PreparedDataset.with_fold`); best.pt and last.pt record it (`fold`), as do config.json and the
MLflow run (param and tag `fold`); `--resume` refuses a checkpoint of another fold.

Validation every `val_every` epochs (and after the last) runs `pipeline.inference.predict` on
whole validation images; the checkpoint with the best validation Dice is `best.pt`. Two classes: each
validation also picks the best-F1 and best mean Dice thresholds on its probabilities
(`pipeline.training.validation.validation_thresholds`), stored as `thresholds` in best.pt (those of
its epoch; also in thresholds.json, JSON null for K > 2, and the run's MLflow metrics) and in last.pt
(those of its own epoch if it was validated, else None); `segpipe infer --threshold val` reads them.
Datasets with reference instances: after the last epoch best.pt's instance settings are chosen on
the validation images (`pipeline.training.instance_output`) and logged (params instances.*, val_seg).
`last.pt` is written atomically after every epoch with the optimizer state, the torch RNG state and
the log, so `--resume` continues a killed run to the same result as an uninterrupted one. last.pt also
holds the MLflow run id: a resumed training continues its own run (one run per training).

Under `torchrun` every rank trains on its share of each step's patches (DistributedDataParallel,
gloo on CPU, nccl on CUDA); only rank 0 validates, writes files and logs to MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from monai.data import set_track_meta
from tqdm import tqdm

from pipeline.data.io import write_text
from pipeline.data.prepared import PreparedDataset
from pipeline.errors import SegpipeError
from pipeline.inference.settings import InferenceSettings
from pipeline.networks import save_checkpoint
from pipeline.networks.precision import autocast, fp32_output
from pipeline.tracking import TrackingSettings, stage_run
from pipeline.tracking_datasets import DataInput
from pipeline.training.distributed import all_mean, init_distributed, max_over_ranks
from pipeline.training.epochs import epoch_metrics, epoch_summary, log_epochs, log_text, logged_epochs
from pipeline.training.instance_output import choose_instances
from pipeline.training.mlflow_model import log_best_model
from pipeline.training.optim import learning_rate
from pipeline.training.outputs import run_outputs
from pipeline.training.settings import TrainSettings
from pipeline.training.trainer import Progress, Trainer, build_trainer, restore, resume_settings
from pipeline.training.validation import (
    threshold_metrics,
    validate,
    validation_cases,
    validation_settings,
    validation_thresholds,
)


@dataclass(frozen=True)
class TrainResult:
    """What a finished training wrote and how it went."""

    out_dir: Path
    checkpoint: Path
    epochs: int
    steps: int
    best_val_dice: float
    wall_seconds: float
    stopped_early: bool


def _train_epoch(
    t: Trainer, epoch: int, deadline: float | None, clock: float
) -> tuple[dict[str, Any], torch.Tensor, bool]:
    """One epoch of optimizer steps: (log row without validation, mean losses [total, heads...],
    stopped by the time limit). `deadline`: the wall budget in seconds (None: no limit), counted
    from the `time.perf_counter()` value `clock`."""
    s, ctx = t.settings, t.ctx
    epochs, steps = int(s.epochs), int(s.steps_per_epoch)
    t.model.train()
    t.sampler.set_epoch(epoch)
    t0, wait, loss_sum, head_sums, n_steps, stopped, lr = time.perf_counter(), 0.0, 0.0, None, 0, False, 0.0
    bar = tqdm(
        total=steps,
        desc=f"{s.dataset}/{s.network_key} epoch {epoch + 1}/{epochs}",
        unit="step",
        disable=not ctx.main,
        leave=False,
        dynamic_ncols=True,
    )
    batches = iter(t.loader)
    fov_key = s.augment["patches"]["fov_key"]
    for step_in_epoch in range(steps):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        lr = learning_rate(epoch * steps + step_in_epoch, epochs * steps, steps, float(s.optimizer["lr"]), s.schedule)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        data = {k: torch.as_tensor(batch[k]).to(ctx.device, non_blocking=True) for k in t.keys}
        with autocast(s.precision, ctx.device):
            output = t.forward(data["image"].contiguous(memory_format=t.layout))
        heads = t.loss_fn.head_losses(
            fp32_output(output),
            data["label"],
            data["weight"] if s.weight_map else None,
            data[fov_key] if fov_key else None,
        )
        loss = t.loss_fn.combine(heads)
        if not torch.isfinite(loss):
            raise SegpipeError(
                f"{s.dataset}/{s.network_key}: loss became {loss.item()} at epoch {epoch + 1} "
                f"step {step_in_epoch + 1}; lower optimizer.lr in configs/train.yaml"
            )
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        if s.grad_clip is not None:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), float(s.grad_clip))
        t.scaler.step(t.optimizer)
        t.scaler.update()
        detached = torch.stack([h.detach().float() for h in heads]).cpu()
        head_sums = detached if head_sums is None else head_sums + detached
        loss_sum += loss.item()
        n_steps += 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_sum / n_steps:.4f}",
            patches_s=f"{n_steps * t.patches_per_rank * ctx.world / (time.perf_counter() - t0):.0f}",
        )
        # one clock for all ranks, so that they agree on stopping
        if deadline is not None and max_over_ranks(time.perf_counter() - clock, ctx) > deadline:
            stopped = True
            break
    bar.close()
    seconds = time.perf_counter() - t0
    means = all_mean(torch.cat([torch.tensor([loss_sum]), head_sums]) / max(1, n_steps), ctx)
    row = {
        "epoch": epoch + 1,
        "step": epoch * steps + n_steps,
        "lr": lr,
        "train_loss": float(means[0]),
        "val_dice": "",
        "val_iou": "",
        "patches_per_s": n_steps * t.patches_per_rank * ctx.world / seconds,
        "data_wait_share": wait / seconds,
        "seconds": seconds,
    }
    return row, means, stopped


def _validate_and_save(
    t: Trainer,
    progress: Progress,
    row: dict[str, Any],
    means: torch.Tensor,
    validation: tuple[list[dict[str, Any]], InferenceSettings],
    out_dir: Path,
    last: bool,
    clock: float,
) -> None:
    """Rank 0 after an epoch: validation when due (best.pt when it improved), the epoch's MLflow
    metrics (`progress.epoch_metrics`), last.pt and log.csv."""
    s, epoch, thresholds = t.settings, int(row["epoch"]), None
    if epoch % int(s.val_every) == 0 or last:
        result = validate(t.model, *validation)
        row["val_dice"], row["val_iou"] = result.dice, result.iou
        thresholds = validation_thresholds(result.histograms)
        if row["val_dice"] > progress.best["val_dice"] or progress.best["epoch"] < 0:
            progress.best = {"val_dice": row["val_dice"], "epoch": epoch, "thresholds": thresholds}
            save_checkpoint(
                t.model,
                out_dir / "best.pt",
                dataset=s.dataset,
                network_key=s.network_key,
                profile=s.profile,
                epoch=epoch,
                val_dice=row["val_dice"],
                augment=s.augment,
                precision=s.precision,
                class_names=t.class_names,
                fold=s.fold,
                thresholds=thresholds,
                target=s.target,
            )
            write_text(out_dir / "thresholds.json", json.dumps(thresholds, indent=2) + "\n")
    row["elapsed_seconds"] = time.perf_counter() - clock
    progress.log_rows.append(row)
    progress.epoch_metrics.append({"epoch": epoch, **epoch_metrics(row, means)})
    save_checkpoint(
        t.model,
        out_dir / "last.pt",
        settings=resume_settings(s),
        optimizer=t.optimizer.state_dict(),
        scaler=t.scaler.state_dict(),
        torch_rng=torch.get_rng_state(),
        epoch=epoch,
        best=dict(progress.best),
        log=progress.log_rows,
        mlflow_run_id=progress.run_id,
        mlflow_epoch_metrics=progress.epoch_metrics,
        class_names=t.class_names,
        fold=s.fold,
        thresholds=thresholds,
    )
    write_text(out_dir / "log.csv", log_text(progress.log_rows))


def run_training(
    settings: TrainSettings,
    prepared: PreparedDataset,
    out_dir: Path,
    inference: InferenceSettings,
    *,
    resume: bool = False,
    tracking: TrackingSettings | None = None,
    plan: Mapping[str, Any] | None = None,
    median_area: float | None = None,
) -> TrainResult:
    """Train as `settings` say (`pipeline.training.settings.resolve_settings`) on `prepared`; writes
    `out_dir`: best.pt, last.pt, log.csv, config.json, as one set (`pipeline.training.outputs`: a failed
    fresh run leaves the previous run's files). `inference`: configs/inference.yaml's
    settings, which validation uses (without TTA). `tracking`: configs/tracking.yaml's settings;
    the MLflow run gets the train and val splits as dataset inputs. `plan`: the training plan
    (`pipeline.training.planning`, whose values `settings` hold), written as plan.json beside config.json
    and logged to MLflow as an artifact and the params plan.KEY."""
    start = time.perf_counter()
    ctx = init_distributed()
    set_track_meta(False)
    trainer = build_trainer(settings, prepared, ctx)
    progress = restore(trainer, out_dir / "last.pt") if resume else Progress()
    with run_outputs(out_dir, resume, enabled=ctx.main):
        return _train(trainer, progress, prepared, out_dir, inference, tracking, resume, start, plan, median_area)


def _train(
    trainer: Trainer,
    progress: Progress,
    prepared: PreparedDataset,
    out_dir: Path,
    inference: InferenceSettings,
    tracking: TrackingSettings | None,
    resume: bool,
    start: float,
    plan: Mapping[str, Any] | None = None,
    median_area: float | None = None,
) -> TrainResult:
    """The epochs of `run_training`, from `progress` on, with validation, checkpoints and MLflow."""
    settings, ctx = trainer.settings, trainer.ctx
    dataset, network = settings.dataset, settings.network_key
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.json", json.dumps(settings.to_dict(), indent=2, default=str) + "\n")
        if plan is not None:
            write_text(out_dir / "plan.json", json.dumps(plan, indent=2) + "\n")
    validation = (validation_cases(prepared, settings) if ctx.main else [], validation_settings(inference, ctx.device))
    limit = None if settings.max_minutes is None else float(settings.max_minutes) * 60
    clock = start - progress.previous_elapsed  # a resumed run's budget counts the killed run's time
    epochs, stopped_early, epoch = int(settings.epochs), False, progress.first_epoch

    params = {k: v for k, v in settings.to_dict().items() if k != "augment"}
    if plan is not None:  # the plan's limits and values: plan.memory_budget_mb, plan.patch_size, ...
        params["plan"] = {**settings.plan, **{k: e["value"] for k, e in plan["entries"].items()}}
    data = [
        DataInput(prepared.manifest_path, dataset, "train", "training", settings.fold),
        DataInput(prepared.manifest_path, dataset, "val", "validation", settings.fold),
    ]
    with stage_run(
        "train",
        dataset,
        params=params,
        manifest=prepared.manifest_path,
        network=network,
        datasets=data,
        tracking=tracking,
        run_id=progress.run_id,
    ) as tracker:
        if tracker is not None:  # kept in last.pt: --resume continues this run
            progress.run_id = tracker.active_run().info.run_id
            tracker.set_tag("fold", str(settings.fold))
        if tracker is not None and resume:
            tracker.set_tag("resumed_from_epoch", str(progress.first_epoch))
            # epochs checkpointed but not logged (killed in between), or a new run: the whole history
            log_epochs(tracker, progress.epoch_metrics, logged_epochs(tracker))
        for epoch in range(progress.first_epoch, epochs):
            row, means, stopped_early = _train_epoch(trainer, epoch, limit, clock)
            if ctx.main:
                _validate_and_save(
                    trainer, progress, row, means, validation, out_dir, stopped_early or epoch + 1 == epochs, clock
                )
                if tracker is not None:
                    log_epochs(tracker, progress.epoch_metrics[-1:], epoch)
                tqdm.write(epoch_summary(row, epochs))
            if ctx.world > 1:
                dist.barrier()
            if stopped_early:
                break
        best = progress.best
        instances = (
            choose_instances(out_dir / "best.pt", prepared, settings, validation[1], median_area) if ctx.main else None
        )
        wall = time.perf_counter() - start
        if tracker is not None:
            tracker.log_metrics(
                {
                    "best_val_dice": best["val_dice"],
                    "best_epoch": best["epoch"],
                    "wall_seconds": wall,
                    **threshold_metrics(best.get("thresholds")),
                }
            )
            if stopped_early:  # only then: a tag on every run would say nothing
                tracker.set_tag("stopped_by_time_limit", "true")
            for name in ("config.json", "log.csv", "best.pt", "thresholds.json"):
                if name != "thresholds.json" or (out_dir / name).is_file():  # absent: best.pt of an older segpipe
                    tracker.log_artifact(str(out_dir / name))
            if plan is not None:
                tracker.log_artifact(str(out_dir / "plan.json"))
            if instances is not None:
                tracker.log_params({f"instances.{k}": v for k, v in instances.settings.to_dict().items()})
                tracker.log_metrics({"val_seg": instances.val_seg})
                tracker.log_artifact(str(out_dir / "instances.json"))
            if tracking is not None and tracking.log_model:
                log_best_model(out_dir / "best.pt", settings, inference, best, register=tracking.register_model)
    if ctx.world > 1:
        dist.destroy_process_group()
    steps = int(progress.log_rows[-1]["step"]) if progress.log_rows else 0
    if ctx.main:
        print(
            f"{dataset}/{network}: best validation Dice {best['val_dice']:.4f} at epoch {best['epoch']} "
            f"({settings.network}, {steps} steps, {wall / 60:.1f} min"
            f"{', STOPPED BY max_minutes' if stopped_early else ''}) -> {out_dir / 'best.pt'}"
        )
    return TrainResult(out_dir, out_dir / "best.pt", epoch + 1, steps, float(best["val_dice"]), wall, stopped_early)
