"""`segpipe train DATASET NETWORK`: patch training with validation, checkpoints, resume and DDP.

Data: the prepared cases of the training split, normalised once and held by a MONAI
`CacheDataset`; patches come from the dataset's augmentation preset (overlap-tile crop, elastic
deformation, flips, gray values; `pipeline.transforms.presets`). Every patch is a pure function of
(seed, epoch, item index): the item's transforms are re-seeded from those three numbers, so the
data do not depend on DataLoader workers, on the number of DDP ranks, or on where a run was
resumed. A step takes `batch_size` patches (all ranks together); an epoch is `steps_per_epoch`
steps.

Optimisation: Adam/AdamW or the U-Net paper's SGD with momentum 0.99; learning rate per step
(linear warm-up, then cosine / poly / step / constant); gradient-norm clipping; autocast (bf16 or
fp16 with a grad scaler) on CUDA, fp32 on the CPU; channels-last (NHWC) weights and batches;
optional `torch.compile`. With `max_minutes` the run stops once that wall-clock budget is spent
and the schedule advances with the larger of the step count and the share of the budget used, so
the learning rate anneals in time either way (such a run depends on the machine's speed; without
the budget, runs are deterministic). A resumed run continues the budget: the wall time of the
killed run's checkpointed epochs counts.

Validation every `val_every` epochs (and after the last) runs `pipeline.inference.predict` on
whole validation images; the checkpoint with the best validation Dice is `best.pt`. `last.pt` is
written atomically after every epoch with the optimizer state, the torch RNG state and the log,
so `--resume` continues a killed run to the same result as an uninterrupted one.

Under `torchrun` every rank trains on its share of each step's patches (DistributedDataParallel,
gloo on CPU, nccl on CUDA); only rank 0 validates, writes files and logs to MLflow.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, list_data_collate, set_track_meta
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.data.io import write_text
from pipeline.engine.data import PreparedDataset, open_prepared
from pipeline.engine.losses import DeepSupervisionLoss, build_loss
from pipeline.engine.settings import resolve_settings
from pipeline.errors import SegpipeError
from pipeline.metrics import confusion
from pipeline.networks import SegmentationNetwork, build_network, read_checkpoint, save_checkpoint
from pipeline.tracking import stage_run

LOG_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_dice", "val_iou", "patches_per_s",
               "data_wait_share", "seconds", "elapsed_seconds")
"""log.csv: `seconds` = the epoch's training steps; `elapsed_seconds` = wall time of the training so
far (set-up, validation and checkpoints included; a resumed run adds to the killed run's time)."""
RESUME_KEYS = ("dataset", "network_key", "network", "network_config", "augment", "seed", "epochs",
               "steps_per_epoch", "batch_size", "patch_size", "optimizer", "schedule", "grad_clip",
               "loss", "weight_map")
"""Settings a resumed run must share with the checkpoint (others, e.g. workers, may change)."""


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


# --- distributed ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device)


def _all_mean(values: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world > 1:
        values = values.to(ctx.device)
        dist.all_reduce(values)
        values = values / ctx.world
    return values.cpu()


def _max_over_ranks(value: float, ctx: Dist) -> float:
    """The largest `value` of all ranks (so that time-based decisions agree across ranks)."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# --- data -----------------------------------------------------------------------------------------


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The transform seed of item `index` of `epoch` (independent of workers and ranks)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] % (2**31))


class PatchDataset(Dataset):
    """Training patches: key (epoch, index) -> the list of patch dicts of one augmented case.

    Item `index` of `epoch` uses case `perm[index % n]` of a seeded permutation per pass over the
    n cases, and its transforms are seeded with `item_seed(seed, epoch, index)`.
    """

    def __init__(self, cases: CacheDataset, augment: Compose, seed: int) -> None:
        self.cases = cases
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.cases)

    def case_index(self, epoch: int, index: int) -> int:
        n = len(self.cases)
        perm = np.random.default_rng([self.seed, epoch, index // n]).permutation(n)
        return int(perm[index % n])

    def __getitem__(self, key: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        epoch, index = key
        case = dict(self.cases[self.case_index(epoch, index)])
        self.augment.set_random_state(seed=item_seed(self.seed, epoch, index))
        out = self.augment(case)
        return out if isinstance(out, list) else [out]


class StepSampler(Sampler[tuple[int, int]]):
    """Keys (epoch, index) of this rank: step s of the epoch covers items [s*G, (s+1)*G) of all
    ranks (G items per step), rank r takes the r-th contiguous share."""

    def __init__(self, steps: int, items_per_step: int, rank: int, world: int) -> None:
        self.steps, self.items, self.rank, self.world = steps, items_per_step, rank, world
        self.per_rank = items_per_step // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.steps):
            first = step * self.items + self.rank * self.per_rank
            for index in range(first, first + self.per_rank):
                yield self.epoch, index


def training_cases(prepared: PreparedDataset, keys: list[str]) -> list[dict[str, np.ndarray]]:
    """The training split as dicts holding only the keys the patch transforms handle."""
    cases = []
    for case in prepared.cases("train"):
        arrays = prepared.load(case)
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise SegpipeError(f"{prepared.manifest_path}: case {case!r} lacks {missing}, needed for training")
        cases.append({k: arrays[k] for k in keys})
    return cases


def patch_keys(settings: Mapping[str, Any]) -> list[str]:
    fov = settings["augment"]["patches"]["fov_key"]
    return ["image", "label", "weight"] + ([fov] if fov else [])


def build_loader(
    prepared: PreparedDataset, settings: Mapping[str, Any], model: SegmentationNetwork, ctx: Dist
) -> tuple[DataLoader, StepSampler, int]:
    """The patch loader of this rank; returns (loader, sampler, patches per step and rank)."""
    from pipeline.transforms.presets import build_preprocess_transforms, build_train_transforms

    num_samples = int(settings["augment"]["patches"]["num_samples"])
    batch = int(settings["batch_size"])
    if batch % (num_samples * ctx.world):
        raise SegpipeError(
            f"batch_size {batch} must be a multiple of patches.num_samples ({num_samples}, configs/augment.yaml) "
            f"x the number of processes ({ctx.world})"
        )
    out_size = model.valid_output_size(int(settings["patch_size"])) if model.padding == "valid" else int(settings["patch_size"])
    try:
        model.input_size(out_size)
    except SegpipeError as exc:
        raise SegpipeError(f"patch_size {out_size} does not fit network {settings['network']}: {exc}") from exc
    dataset, augment_cfg = settings["dataset"], settings["augment"]
    full = build_train_transforms(dataset, model.halo, out_size, augment_cfg)
    n_pre = len(build_preprocess_transforms(dataset, augment_cfg).transforms)
    cache = CacheDataset(training_cases(prepared, patch_keys(settings)), Compose(full.transforms[:n_pre]),
                         cache_rate=1.0, num_workers=None, copy_cache=False, progress=False)
    patches = PatchDataset(cache, Compose(full.transforms[n_pre:]), int(settings["seed"]))
    sampler = StepSampler(int(settings["steps_per_epoch"]), batch // num_samples, ctx.rank, ctx.world)
    workers = int(settings["workers"])
    loader = DataLoader(patches, batch_size=sampler.per_rank, sampler=sampler, num_workers=workers,
                        collate_fn=list_data_collate, persistent_workers=workers > 0,
                        pin_memory=ctx.device.type == "cuda")
    return loader, sampler, batch // ctx.world


# --- optimisation ---------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam / AdamW, or SGD with (Nesterov) momentum: the U-Net paper uses SGD, momentum 0.99."""
    params, lr, wd = model.parameters(), float(cfg["lr"]), float(cfg["weight_decay"])
    if cfg["name"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg["name"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(cfg["momentum"]),
                           nesterov=bool(cfg["nesterov"]))


def learning_rate(step: int, total: int, steps_per_epoch: int, base: float, cfg: Mapping[str, Any]) -> float:
    """LR at optimizer step `step` of `total`: linear warm-up over warmup_steps, then
    cosine: min + (base - min) (1 + cos(pi t)) / 2;  poly: base (1 - t)^power (nnU-Net, power 0.9);
    step: base * gamma^(epoch // step_epochs);  constant: base;  t = progress after warm-up in [0, 1]."""
    warm = int(cfg["warmup_steps"])
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    name, low = cfg["name"], float(cfg["min_lr"])
    if name == "cosine":
        return low + (base - low) * (1 + math.cos(math.pi * t)) / 2
    if name == "poly":
        return max(low, base * (1 - t) ** float(cfg["poly_power"]))
    if name == "step":
        return base * float(cfg["gamma"]) ** ((step // steps_per_epoch) // int(cfg["step_epochs"]))
    return base


# --- validation -----------------------------------------------------------------------------------


def validation_cases(prepared: PreparedDataset, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validation images normalised like training, with labels and the FOV if any."""
    from pipeline.engine.data import preprocess

    out = []
    for case in prepared.cases("val"):
        arrays = prepared.load(case)
        out.append({
            "case": case,
            "image": preprocess(settings["dataset"], arrays["image"], settings["augment"]),
            "label": arrays["label"][0] > 0,
            "fov": arrays["fov"][0] > 0 if "fov" in arrays else None,
        })
    return out


def validate(model: SegmentationNetwork, cases: list[dict[str, Any]], device: torch.device) -> tuple[float, float]:
    """Mean Dice and IoU over whole validation images (sliding-window `predict`, threshold 0.5,
    inside the FOV when the dataset has one)."""
    from pipeline.inference.sliding import inference_network, load_settings, predict

    if not cases:
        return float("nan"), float("nan")
    settings = load_settings(intensity="none", device=device.type, tta=())
    net = inference_network(model, settings)
    dices, ious = [], []
    for case in cases:
        probs = predict(net, case["image"], settings=settings)
        pred = probs[0] >= 0.5 if probs.shape[0] == 1 else probs.argmax(0) > 0
        scores = confusion(pred, case["label"], case["fov"]).scores()
        dices.append(scores["dice"])
        ious.append(scores["iou"])
    return float(np.mean(dices)), float(np.mean(ious))


# --- the loop -------------------------------------------------------------------------------------


def _log_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _resume_state(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    state = read_checkpoint(path)
    saved = state.get("settings") or {}
    current = _resume_settings(settings)
    changed = [k for k in RESUME_KEYS if saved.get(k) != current[k]]
    if changed:
        raise SegpipeError(
            f"{path}: cannot resume, settings changed since this checkpoint: {changed}; "
            "train without --resume to start over"
        )
    return state


def _to_device(batch: Mapping[str, Any], keys: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(batch[k]).to(device, non_blocking=True) for k in keys}


def train(
    dataset: str,
    network: str,
    *,
    profile: str | None = None,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    models_dir: Path | None = None,
    prepared: PreparedDataset | None = None,
) -> TrainResult:
    """Train `network` (the DVC matrix name: unet, unetpp, u2net, ...) on `dataset`.

    Writes models/<dataset>/<network>/: best.pt, last.pt, log.csv, config.json.
    """
    start = time.perf_counter()
    ctx = init_distributed()
    settings = resolve_settings(dataset, network, profile, overrides)
    out_dir = Path(models_dir or settings["models_dir"]) / dataset / network
    prepared = prepared or open_prepared(dataset)
    set_track_meta(False)
    torch.manual_seed(int(settings["seed"]))
    channels = settings["augment"]["channels"]
    in_channels = len(channels) if channels else prepared.in_channels
    model = build_network(settings["network"], in_channels, 1, **settings["network_config"])
    layout = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    model.to(ctx.device, memory_format=layout)
    loader, sampler, patches_per_rank = build_loader(prepared, settings, model, ctx)
    loss_fn = build_loss(settings["network"], settings["loss"], source=f"configs/train.yaml: profiles.{settings['profile']}.loss")
    optimizer = build_optimizer(model, settings["optimizer"])
    epochs, steps = int(settings["epochs"]), int(settings["steps_per_epoch"])
    amp = ctx.device.type == "cuda" and settings["amp"] != "fp32"
    amp_dtype = torch.bfloat16 if settings["amp"] == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    first_epoch, best, log_rows, previous_elapsed = 0, {"val_dice": -1.0, "epoch": -1}, [], 0.0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume:
        if not last_path.is_file():
            raise SegpipeError(f"{last_path}: nothing to resume; train without --resume")
        state = _resume_state(last_path, settings)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        first_epoch, best, log_rows = int(state["epoch"]), dict(state["best"]), list(state["log"])
        previous_elapsed = float(log_rows[-1]["elapsed_seconds"]) if log_rows else 0.0
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.json", json.dumps(settings, indent=2, default=str) + "\n")

    net: torch.nn.Module = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    forward = torch.compile(net) if settings["compile"] else net
    val_cases = validation_cases(prepared, settings) if ctx.main else []
    keys = patch_keys(settings)
    fov_key = settings["augment"]["patches"]["fov_key"]
    limit = None if settings["max_minutes"] is None else float(settings["max_minutes"]) * 60
    # spent: budget used at the end of the last step (max over ranks); a resumed run goes on with
    # the wall time its checkpointed epochs used
    stopped_early, spent = False, previous_elapsed

    params = {k: v for k, v in settings.items() if k not in ("augment",)}
    with stage_run("train", dataset, params=params, manifest=prepared.manifest_path, network=network) as tracker:
        if tracker is not None and resume:
            tracker.set_tag("resumed_from_epoch", str(first_epoch))
        epoch = first_epoch
        for epoch in range(first_epoch, epochs):
            model.train()
            sampler.set_epoch(epoch)
            t0, wait, loss_sum, head_sums, n_steps = time.perf_counter(), 0.0, 0.0, None, 0
            bar = tqdm(total=steps, desc=f"{dataset}/{network} epoch {epoch + 1}/{epochs}", unit="step",
                       disable=not ctx.main, leave=False, dynamic_ncols=True)
            batches = iter(loader)
            for step_in_epoch in range(steps):
                t_wait = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t_wait
                step = epoch * steps + step_in_epoch
                if limit is not None:  # a wall-clock budget: the schedule follows the time spent
                    step = max(step, int(epochs * steps * spent / limit))
                lr = learning_rate(step, epochs * steps, steps, float(settings["optimizer"]["lr"]), settings["schedule"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                data = _to_device(batch, keys, ctx.device)
                with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp):
                    output = forward(data["image"].contiguous(memory_format=layout))
                heads = loss_fn.head_losses(
                    _float(output), data["label"], data["weight"] if settings["weight_map"] else None,
                    data[fov_key] if fov_key else None,
                )
                loss = loss_fn.combine(heads)
                if not torch.isfinite(loss):
                    raise SegpipeError(f"{dataset}/{network}: loss became {loss.item()} at epoch {epoch + 1} "
                                       f"step {step_in_epoch + 1}; lower optimizer.lr in configs/train.yaml")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if settings["grad_clip"] is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(settings["grad_clip"]))
                scaler.step(optimizer)
                scaler.update()
                detached = torch.stack([h.detach().float() for h in heads]).cpu()
                head_sums = detached if head_sums is None else head_sums + detached
                loss_sum += loss.item()
                n_steps += 1
                elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_steps:.4f}", patches_s=f"{n_steps * patches_per_rank * ctx.world / elapsed:.0f}")
                if limit is not None:
                    spent = _max_over_ranks(previous_elapsed + time.perf_counter() - start, ctx)  # one clock for all ranks
                    if spent > limit:
                        stopped_early = True
                        break
            bar.close()
            seconds = time.perf_counter() - t0
            means = _all_mean(torch.cat([torch.tensor([loss_sum]), head_sums]) / max(1, n_steps), ctx)
            last = stopped_early or epoch + 1 == epochs
            row = {
                "epoch": epoch + 1, "step": epoch * steps + n_steps, "lr": lr, "train_loss": float(means[0]),
                "val_dice": "", "val_iou": "",
                "patches_per_s": n_steps * patches_per_rank * ctx.world / seconds, "data_wait_share": wait / seconds,
                "seconds": seconds,
            }
            if ctx.main:
                if (epoch + 1) % int(settings["val_every"]) == 0 or last:
                    row["val_dice"], row["val_iou"] = validate(model, val_cases, ctx.device)
                    if row["val_dice"] > best["val_dice"] or best["epoch"] < 0:
                        best = {"val_dice": row["val_dice"], "epoch": epoch + 1}
                        save_checkpoint(model, best_path, dataset=dataset, network_key=network,
                                        profile=settings["profile"], epoch=epoch + 1, val_dice=row["val_dice"],
                                        augment=settings["augment"])
                row["elapsed_seconds"] = previous_elapsed + time.perf_counter() - start
                log_rows.append(row)
                _save_last(model, last_path, settings, optimizer, scaler, epoch + 1, best, log_rows)
                write_text(out_dir / "log.csv", _log_text(log_rows))
                if tracker is not None:
                    metrics = {k: float(row[k]) for k in ("train_loss", "lr", "patches_per_s", "data_wait_share")}
                    metrics.update({f"train_loss_head{i}": float(v) for i, v in enumerate(means[1:])} if len(means) > 2 else {})
                    if row["val_dice"] != "":
                        metrics.update(val_dice=row["val_dice"], val_iou=row["val_iou"])
                    tracker.log_metrics(metrics, step=epoch + 1)
                tqdm.write(_summary(row, epochs))
            if ctx.world > 1:
                dist.barrier()
            if stopped_early:
                break
        wall = time.perf_counter() - start
        if tracker is not None:
            tracker.log_metrics({"best_val_dice": best["val_dice"], "best_epoch": best["epoch"], "wall_seconds": wall})
            tracker.set_tag("stopped_by_time_limit", str(stopped_early))
            for name in ("config.json", "log.csv", "best.pt"):
                tracker.log_artifact(str(out_dir / name))
    if ctx.world > 1:
        dist.destroy_process_group()
    if ctx.main:
        print(f"{dataset}/{network}: best validation Dice {best['val_dice']:.4f} at epoch {best['epoch']} "
              f"({settings['network']}, {wall / 60:.1f} min{', stopped by max_minutes' if stopped_early else ''}) "
              f"-> {best_path}")
    return TrainResult(out_dir, best_path, epoch + 1, (epoch + 1) * steps, float(best["val_dice"]), wall, stopped_early)


def _float(output: Any) -> Any:
    """Network output in fp32 for the loss (autocast may give bf16/fp16 logits)."""
    if isinstance(output, torch.Tensor):
        return output.float()
    main, aux = output
    return main.float(), [a.float() for a in aux]


def _save_last(model: SegmentationNetwork, path: Path, settings: Mapping[str, Any], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, epoch: int, best: Mapping[str, Any], log_rows: list[dict[str, Any]]) -> None:
    """The resume state after `epoch` completed epochs (atomic)."""
    save_checkpoint(
        model, path,
        settings=_resume_settings(settings),
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), torch_rng=torch.get_rng_state(),
        epoch=epoch, best=dict(best), log=log_rows,
    )


def _resume_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The RESUME_KEYS of `settings` as plain JSON values (as stored in last.pt)."""
    return json.loads(json.dumps({k: settings[k] for k in RESUME_KEYS}, default=str))


def _summary(row: Mapping[str, Any], epochs: int) -> str:
    val = f" | val Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f}" if row["val_dice"] != "" else ""
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}{val} | lr {row['lr']:.2e}  "
            f"{row['patches_per_s']:.0f} patches/s  data wait {100 * row['data_wait_share']:.0f}%  {row['seconds']:.0f} s")
