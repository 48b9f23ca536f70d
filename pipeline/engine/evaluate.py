"""Evaluation of a trained network on the test split: `segpipe evaluate DATASET NETWORK` (issue 6).

Reads models/<dataset>/<network>/best.pt (configs/train.yaml: models_dir), normalises every image
as the checkpoint records (`preprocess(dataset, image, ckpt["augment"])`) and predicts whole images
with the project's sliding-window inference (`pipeline.inference.predict`, configs/inference.yaml
with the overrides of configs/evaluate.yaml, intensity "none"). Writes, each file atomically,
results/<dataset>/<network>/ (configs/evaluate.yaml: results_dir):

    metrics.json          means over test images and pooled-pixel values (`dvc metrics`)
    per_image.csv         one row per test image
    roc.csv, pr.csv       pooled test ROC (fpr, tpr) and PR (recall, precision) curves (`dvc plots`)
    heads.csv             deep-supervised networks: Dice/IoU per head (see "Heads"); others: header only
    overlays/<case>.png   the image with true positives green, false positives red, false negatives blue

Metrics (`pipeline.metrics`), inside the field of view when the dataset has one (DRIVE), else on
all pixels. The foreground probability is the sigmoid output for one channel and
1 - P(background) for K > 1 (softmax, channel 0 = background: channel 1 for K = 2); a pixel is
foreground iff probability >= threshold.

    dice, iou                mean over test images at `threshold` (every dataset)
    mean_<s>, pooled_<s>     s in f1, accuracy, sensitivity, specificity, precision (pooled also
                             iou): mean over images (undefined per-image ratios skipped), or one
                             confusion over all test pixels, as the DRIVE literature reports them
    <key>_best               the same at the best-F1 threshold picked on the validation split
                             (`best_f1_threshold` on its pooled pixels): `threshold_best`, `val_best_f1`
    mean_auc, pooled_auc     AUC-ROC per image (mean) and over all test pixels
    maxf, maxf_threshold, mae  U2-Net (Qin et al. 2020, sec. 4.2): maxF_beta (beta^2 = 0.3) over the
                             test images, MAE per image (mean); computed for every network
    seg, mean_seg            cells (reference `instances`): CTC SEG of the connected components of
                             the thresholded prediction (`label_instances`), the mean Jaccard over all
                             reference objects of the test set (the challenge's, and the U-Net
                             paper's Table 2 "IOU"), and the mean of per-image SEG
    observer2_*              DRIVE's second observer (`label2`) against the reference: a human
                             reference row (pooled and mean F1, accuracy, sensitivity, specificity)

Heads (configs/evaluate.yaml: per_head), Dice/IoU at `threshold`, mean over test images:
UNet++ L1..Lp are the pruned networks in "fast" mode (`UNetPlusPlus.pruned`, Zhou et al. 2018
Sec. 2 / Fig. 1c-d), each run with `predict` and timed over the test set (seconds, parameters);
U2-Net S1..S6 and fused (Qin et al. 2020 Fig. 5) come from one pass of `U2NetHeads` through
MONAI's `sliding_window_inference` with the same windows, blending and flips as `predict`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import config_dir, load_config
from pipeline.data.io import atomic_path, write_text
from pipeline.engine.data import PreparedDataset, open_prepared, preprocess
from pipeline.errors import SegpipeError
from pipeline.inference import InferenceNetwork, InferenceSettings, load_settings, optimize_network, predict
from pipeline.inference.sliding import inference_network, probabilities, tta_logits
from pipeline.metrics import (
    Confusion,
    best_f1_threshold,
    confusion,
    label_instances,
    mae,
    max_f_beta,
    pr_curve,
    roc_auc,
    roc_curve,
    seg_jaccards,
)
from pipeline.networks import SegmentationNetwork, U2Net, UNetPlusPlus, load_model, read_checkpoint
from pipeline.networks.u2net import upsample_like
from pipeline.tracking import stage_run

CONFIG_KEYS = ("results_dir", "threshold", "val_threshold", "overlays", "curve_points", "per_head", "inference")
SCORES = ("f1", "accuracy", "sensitivity", "specificity", "precision")
"""Confusion scores reported as mean_<s> and pooled_<s> (F1 = Dice)."""
OBSERVER_SCORES = ("f1", "accuracy", "sensitivity", "specificity")
OVERLAY_COLOURS = {"tp": (0, 200, 0), "fp": (230, 0, 0), "fn": (0, 90, 255)}
OVERLAY_ALPHA = 0.6


def evaluate_config() -> dict[str, Any]:
    """configs/evaluate.yaml, checked; SegpipeError naming the file and the key otherwise."""
    cfg = load_config("evaluate")
    path = config_dir() / "evaluate.yaml"
    missing, unknown = sorted(set(CONFIG_KEYS) - set(cfg)), sorted(set(cfg) - set(CONFIG_KEYS))
    if missing or unknown:
        raise SegpipeError(f"{path}: missing keys {missing}, unknown keys {unknown}; expected {list(CONFIG_KEYS)}")

    def bad(key: str, expected: str) -> SegpipeError:
        return SegpipeError(f"{path}: {key} must be {expected}, got {cfg[key]!r}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    t = cfg["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
        raise bad("threshold", "a number in (0, 1)")
    for key in ("val_threshold", "per_head"):
        if not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    if cfg["overlays"] is not None and not (is_int(cfg["overlays"]) and cfg["overlays"] >= 0):
        raise bad("overlays", "an integer >= 0 or null (all test images)")
    if not (is_int(cfg["curve_points"]) and cfg["curve_points"] >= 2):
        raise bad("curve_points", "an integer >= 2")
    if not isinstance(cfg["results_dir"], str) or not cfg["results_dir"]:
        raise bad("results_dir", "a folder path")
    cfg["inference"] = cfg["inference"] or {}
    if not isinstance(cfg["inference"], dict):
        raise bad("inference", "a mapping of configs/inference.yaml keys")
    if "intensity" in cfg["inference"]:
        raise SegpipeError(f"{path}: inference.intensity cannot be set: evaluation images are preprocessed as "
                           "the checkpoint records, so intensity is always 'none'")
    return cfg


def checkpoint_path(dataset: str, network: str, models_dir: Path | None = None) -> Path:
    """models/<dataset>/<network>/best.pt (models_dir: configs/train.yaml)."""
    root = Path(models_dir) if models_dir is not None else Path(load_config("train")["models_dir"])
    return root / dataset / network / "best.pt"


def load_trained(path: Path, dataset: str, network: str) -> tuple[SegmentationNetwork, dict[str, Any]]:
    """(network in eval mode, checkpoint dict) of a `segpipe train` checkpoint for `dataset`."""
    if not path.is_file():
        raise SegpipeError(f"{path}: no trained model found; run `segpipe train {dataset} {network}` first")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("augment"), dict):
        raise SegpipeError(f"{path}: checkpoint lacks 'augment' (the preprocessing of training); expected a "
                           f"checkpoint written by `segpipe train {dataset} {network}`")
    if ckpt.get("dataset", dataset) != dataset:
        raise SegpipeError(f"{path}: checkpoint was trained on {ckpt['dataset']!r}, not on {dataset!r}")
    return load_model(path), ckpt


def foreground(probs: np.ndarray) -> np.ndarray:
    """Probabilities (K, H, W) -> foreground probability (H, W): channel 0 for K = 1 (sigmoid),
    1 - P(background) for K > 1 (softmax, channel 0 = background)."""
    if probs.ndim != 3:
        raise SegpipeError(f"evaluate: expected probabilities (K, H, W), got shape {probs.shape}")
    return probs[0] if probs.shape[0] == 1 else np.clip(1.0 - probs[0], 0.0, 1.0)


# --- heads ------------------------------------------------------------------------------------


class U2NetHeads(nn.Module):
    """An eval-mode U2-Net whose output is the logits of its six side outputs and of the fused one.

    (N, in, H, W) -> (N, 7 K, H, W), channels [S1 | ... | S6 | fused], K each (Qin et al. 2020,
    Fig. 5). The side convs' outputs are caught with forward hooks and up-sampled to the input size
    as `U2Net.forward` does; the network stays in eval() mode, so BatchNorm uses its running
    statistics and the fused channels equal the network's eval output.
    """

    def __init__(self, net: U2Net) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        caught: list[torch.Tensor] = []
        hooks = [side.register_forward_hook(lambda _m, _i, out: caught.append(out)) for side in self.net.sides]
        try:
            fused = self.net(x)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([upsample_like(side, x) for side in caught] + [fused], dim=1)


def u2net_head_scores(heads: U2NetHeads, image: np.ndarray, settings: InferenceSettings) -> np.ndarray:
    """Foreground probabilities (7, H, W) of S1..S6 and fused for a preprocessed image (C, H, W).

    MONAI's `sliding_window_inference` over the concatenated logits with the windows (tile,
    overlap), blending (blend, sigma_scale), batch size and window-level flip TTA of `settings`,
    i.e. what `predict` computes for a "same"-padding network, then sigmoid/softmax per head.
    `heads` may wrap the network's inference graph (`optimize_network`, not compiled).
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(settings.device)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return tta_logits(heads, x, settings.tta)

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    heads.eval()
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, settings.tile, settings.batch_size, predictor, overlap=settings.overlap,
            mode=settings.blend, sigma_scale=settings.sigma_scale,
        )[0].float().cpu()
    k = heads.net.out_channels
    return np.stack([foreground(probabilities(part).numpy()) for part in logits.split(k)])


@dataclass
class HeadRunner:
    """One inference pass giving the foreground probabilities (len(names), H, W) of named heads."""

    names: list[str]
    run: Callable[[np.ndarray], np.ndarray]
    parameters: int | None = None
    """UNet++ L_p: the pruned network's parameter count."""
    seconds: float = 0.0
    """Inference time of this pass over the test set (reported for UNet++ levels)."""


def head_runners(model: SegmentationNetwork, settings: InferenceSettings) -> list[HeadRunner]:
    """UNet++: one runner per level L1..Lp (one level without deep supervision); U2-Net: one
    runner for S1..S6 + fused; other networks: none."""
    if isinstance(model, UNetPlusPlus):
        levels = range(1, model.prune_level + 1) if model.deep_supervision else [model.prune_level]
        runners = []
        for level in levels:
            pruned = model.pruned(level, "fast").eval()
            net = inference_network(pruned, settings)
            runners.append(HeadRunner(
                [f"L{level}"],
                lambda x, net=net: foreground(predict(net, x, settings=settings))[None],
                parameters=sum(p.numel() for p in pruned.parameters()),
            ))
        return runners
    if isinstance(model, U2Net):
        graph = optimize_network(  # batch norm folded, channels-last; never compiled (hooks)
            model, settings.device, fold_bn=settings.fold_batch_norm, inplace_act=settings.inplace_activations,
            channels_last=settings.channels_last, threads=settings.threads,
        )
        heads = U2NetHeads(graph.module)
        names = [f"S{k}" for k in range(1, len(model.sides) + 1)] + ["fused"]
        return [HeadRunner(names, lambda x: u2net_head_scores(heads, x, settings))]
    return []


def head_metric_name(head: str, metric: str) -> str:
    """MLflow / metrics.json name of a head metric: head_L1_dice, side_3_dice, fused_dice."""
    if head.startswith("L"):
        return f"head_{head}_{metric}"
    if head.startswith("S"):
        return f"side_{head[1:]}_{metric}"
    return f"{head}_{metric}"


# --- metrics ----------------------------------------------------------------------------------


def pooled_confusion(parts: list[Confusion]) -> Confusion:
    """One confusion from the counts of several images."""
    return Confusion(*(sum(getattr(c, k) for c in parts) for k in ("tp", "fp", "fn", "tn")))


class Tally:
    """Per-image rows and the pooled state of the test set (see the module docstring)."""

    def __init__(self, thresholds: Mapping[str, float]) -> None:
        self.thresholds = dict(thresholds)  # suffix -> threshold: "" and, if picked, "_best"
        self.rows: list[dict[str, Any]] = []
        self.scores: list[np.ndarray] = []  # valid pixels of each image, 1-D
        self.truth: list[np.ndarray] = []
        self.confusions: dict[str, list[Confusion]] = {s: [] for s in self.thresholds}
        self.jaccards: dict[str, list[np.ndarray]] = {s: [] for s in self.thresholds}
        self.observer2: list[Confusion] = []

    def add(
        self,
        case: str,
        scores: np.ndarray,
        label: np.ndarray,
        mask: np.ndarray | None,
        instances: np.ndarray | None = None,
        label2: np.ndarray | None = None,
        seconds: float = math.nan,
    ) -> dict[str, Any]:
        """One test image: scores (H, W) in [0, 1], label/mask/label2 (H, W) bool, instances (H, W) ids."""
        valid = np.ones(label.shape, bool) if mask is None else mask
        s, g = scores[valid], label[valid]
        self.scores.append(s)
        self.truth.append(g)
        row: dict[str, Any] = {"case": case}
        for suffix, t in self.thresholds.items():
            c = confusion(s >= t, g)
            self.confusions[suffix].append(c)
            row.update({f"{name}{suffix}": value for name, value in c.scores().items()})
            if instances is not None:
                _, jaccard = seg_jaccards(label_instances(scores >= t), instances)
                self.jaccards[suffix].append(jaccard)
                row[f"seg{suffix}"] = float(jaccard.mean()) if jaccard.size else math.nan
        row["auc"] = roc_auc(s, g)
        row["mae"] = mae(s, g)
        if label2 is not None:
            c2 = confusion(label2[valid], g)
            self.observer2.append(c2)
            row.update({f"observer2_{name}": getattr(c2, name) for name in OBSERVER_SCORES})
        row["seconds"] = seconds
        self.rows.append(row)
        return row

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def metrics(self) -> dict[str, float]:
        """Means over images and pooled values (module docstring for the keys)."""
        table = self.table()
        out: dict[str, float] = {}
        for suffix in self.thresholds:
            out[f"dice{suffix}"] = table[f"dice{suffix}"].mean()
            out[f"iou{suffix}"] = table[f"iou{suffix}"].mean()
            out.update({f"mean_{name}{suffix}": table[f"{name}{suffix}"].mean() for name in SCORES})
            pooled = pooled_confusion(self.confusions[suffix])
            out.update({f"pooled_{name}{suffix}": getattr(pooled, name) for name in SCORES + ("iou",)})
            if self.jaccards[suffix]:
                jaccards = np.concatenate(self.jaccards[suffix])
                out[f"seg{suffix}"] = float(jaccards.mean()) if jaccards.size else math.nan
                out[f"mean_seg{suffix}"] = table[f"seg{suffix}"].mean()
        s, g = np.concatenate(self.scores), np.concatenate(self.truth)
        out["mean_auc"] = table["auc"].mean()
        out["pooled_auc"] = roc_auc(s, g)
        out["maxf"], out["maxf_threshold"] = max_f_beta(self.scores, self.truth)
        out["mae"] = table["mae"].mean()
        if self.observer2:
            out.update({f"observer2_mean_{n}": table[f"observer2_{n}"].mean() for n in OBSERVER_SCORES})
            pooled2 = pooled_confusion(self.observer2)
            out.update({f"observer2_pooled_{n}": getattr(pooled2, n) for n in OBSERVER_SCORES})
        return {k: float(v) for k, v in out.items()}

    def curves(self, max_points: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Pooled test ROC (fpr, tpr) and PR (recall, precision) curves, at most max_points each."""
        s, g = np.concatenate(self.scores), np.concatenate(self.truth)
        fpr, tpr, _ = roc_curve(s, g, max_points=max_points)
        precision, recall, _ = pr_curve(s, g, max_points=max_points)
        return pd.DataFrame({"fpr": fpr, "tpr": tpr}), pd.DataFrame({"recall": recall, "precision": precision})


# --- overlays ---------------------------------------------------------------------------------


def render_rgb(image: np.ndarray) -> np.ndarray:
    """A stored image (C, H, W) as RGB uint8 (H, W, 3): three channels as RGB, otherwise the first
    as gray; uint8 as stored, other types stretched from their 0.5..99.5 percentiles."""
    a = image[:3] if image.shape[0] == 3 else image[:1]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = np.percentile(a, (0.5, 99.5))
        a = (np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0) * 255).round().astype(np.uint8)
    rgb = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3): TP green, FP red, FN blue blended over `render_rgb(image)`; pred, label,
    mask (H, W) bool; nothing is coloured outside the mask."""
    rgb = render_rgb(image).astype(np.float32)
    valid = np.ones(label.shape, bool) if mask is None else mask
    for where, colour in ((pred & label, "tp"), (pred & ~label, "fp"), (~pred & label, "fn")):
        sel = where & valid
        rgb[sel] = (1 - OVERLAY_ALPHA) * rgb[sel] + OVERLAY_ALPHA * np.array(OVERLAY_COLOURS[colour], np.float32)
    return rgb.round().astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 image as PNG, atomically."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, rgb, extension=".png")


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in place of `final` (the old one is removed after the rename)."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_csv(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def json_safe(value: Any) -> Any:
    """NaN -> None (null) so that metrics.json is strict JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


# --- the stage --------------------------------------------------------------------------------


@dataclass
class _Case:
    """A loaded case, reduced to what evaluation uses: image (C, H, W) as stored, 2-D masks."""

    name: str
    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray | None
    instances: np.ndarray | None
    label2: np.ndarray | None

    @staticmethod
    def load(data: PreparedDataset, case: str) -> "_Case":
        arrays = data.load(case)

        def plane(role: str, dtype: Any) -> np.ndarray | None:
            return arrays[role][0].astype(dtype) if role in arrays else None

        return _Case(case, arrays["image"], plane("label", bool), plane("fov", bool),
                     plane("instances", np.int64), plane("label2", bool))


@dataclass
class _Predictor:
    """The main network's inference graph and the checkpoint's preprocessing."""

    dataset: str
    net: InferenceNetwork
    augment: dict[str, Any]
    settings: InferenceSettings
    seconds: float = field(default=0.0)

    def inputs(self, case: _Case) -> np.ndarray:
        return preprocess(self.dataset, case.image, self.augment)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Foreground probabilities (H, W) of a preprocessed image; adds to `seconds`."""
        t0 = time.perf_counter()
        out = foreground(predict(self.net, x, settings=self.settings))
        self.seconds += time.perf_counter() - t0
        return out


def pick_threshold(predictor: _Predictor, data: PreparedDataset, desc: str) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over the pooled validation pixels (inside the FOV)."""
    cases = data.cases("val")
    if not cases:
        raise SegpipeError(f"{data.manifest_path}: no validation cases to pick the threshold on; "
                           "set val_threshold: false in configs/evaluate.yaml")
    scores, truth = [], []
    for name in tqdm(cases, desc=desc, unit="image"):
        case = _Case.load(data, name)
        s = predictor.scores(predictor.inputs(case))
        valid = np.ones(case.label.shape, bool) if case.mask is None else case.mask
        scores.append(s[valid])
        truth.append(case.label[valid])
    try:
        return best_f1_threshold(np.concatenate(scores), np.concatenate(truth))
    except SegpipeError as exc:
        raise SegpipeError(f"{data.manifest_path}: validation split: {exc}") from exc


def evaluate(
    dataset: str,
    network: str,
    *,
    models_dir: Path | None = None,
    results_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate models/<dataset>/<network>/best.pt on the test split; returns metrics.json's dict.

    `network` is the DVC matrix name (unet, unetpp, u2net); the checkpoint may hold another
    registry network (u2netp), reported as `network_used`. Logs one MLflow "evaluate" run.
    """
    start = time.perf_counter()
    cfg = evaluate_config()
    path = checkpoint_path(dataset, network, models_dir)
    model, ckpt = load_trained(path, dataset, network)
    data = open_prepared(dataset)
    test_cases = data.cases("test")
    if not test_cases:
        raise SegpipeError(f"{data.manifest_path}: no test cases")
    settings = load_settings(**cfg["inference"], intensity="none")
    out_dir = Path(results_dir if results_dir is not None else cfg["results_dir"]) / dataset / network
    facts = {
        "path": str(path), "network": ckpt["network"], "profile": ckpt.get("profile", ""),
        "epoch": ckpt.get("epoch", ""), "val_dice": ckpt.get("val_dice", ""),
    }
    params = {"evaluate": cfg, "checkpoint": facts, "inference": asdict(settings)}
    tag = f"{dataset}/{network}"
    with stage_run("evaluate", dataset, params=params, manifest=data.manifest_path, network=network) as tracker:
        predictor = _Predictor(dataset, inference_network(model, settings), ckpt["augment"], settings)
        thresholds = {"": float(cfg["threshold"])}
        val_f1 = math.nan
        if cfg["val_threshold"]:
            thresholds["_best"], val_f1 = pick_threshold(predictor, data, f"{tag} val")
        predictor.seconds = 0.0
        runners = head_runners(model, replace(settings, tta=())) if cfg["per_head"] else []  # heads: no TTA
        head_scores: dict[str, list[Confusion]] = {name: [] for r in runners for name in r.names}
        tally = Tally(thresholds)
        n_overlays = len(test_cases) if cfg["overlays"] is None else min(cfg["overlays"], len(test_cases))
        out_dir.mkdir(parents=True, exist_ok=True)
        overlay_tmp = Path(tempfile.mkdtemp(prefix=".overlays.", dir=out_dir))
        try:
            for i, name in enumerate(tqdm(test_cases, desc=f"{tag} test", unit="image")):
                case = _Case.load(data, name)
                x = predictor.inputs(case)
                before = predictor.seconds
                scores = predictor.scores(x)
                tally.add(name, scores, case.label, case.mask, case.instances, case.label2,
                          predictor.seconds - before)
                for runner in runners:
                    t0 = time.perf_counter()
                    per_head = runner.run(x)
                    runner.seconds += time.perf_counter() - t0
                    for head, s in zip(runner.names, per_head):
                        head_scores[head].append(confusion(s >= thresholds[""], case.label, case.mask))
                if i < n_overlays:
                    pred = scores >= thresholds[""]
                    write_png(overlay_tmp / f"{name}.png", overlay(case.image, pred, case.label, case.mask))
            metrics = tally.metrics()
            roc, pr = tally.curves(cfg["curve_points"])
            heads = heads_table(runners, head_scores)
            summary: dict[str, Any] = {
                "dataset": dataset, "network": network, "network_used": ckpt["network"],
                "checkpoint": str(path), "checkpoint_epoch": ckpt.get("epoch"),
                "checkpoint_val_dice": ckpt.get("val_dice"), "test_images": len(test_cases),
                "threshold": thresholds[""],
            }
            if cfg["val_threshold"]:
                summary.update(threshold_best=thresholds["_best"], val_best_f1=val_f1)
            summary.update(metrics)
            summary.update(head_metrics(heads))
            summary["inference_seconds"] = predictor.seconds
            summary["seconds"] = time.perf_counter() - start
            summary = {k: json_safe(v) for k, v in summary.items()}
            write_csv(out_dir / "per_image.csv", tally.table())
            write_csv(out_dir / "roc.csv", roc)
            write_csv(out_dir / "pr.csv", pr)
            write_csv(out_dir / "heads.csv", heads)
            replace_dir(overlay_tmp, out_dir / "overlays")
            write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")  # last: the run is complete
        finally:
            shutil.rmtree(overlay_tmp, ignore_errors=True)
        if tracker is not None:
            log_run(tracker, summary, metrics, out_dir, heads)
    print(summary_text(summary, heads))
    return summary


def heads_table(runners: list[HeadRunner], head_scores: Mapping[str, list[Confusion]]) -> pd.DataFrame:
    """heads.csv: head, dice, iou (mean over test images); UNet++ also seconds and parameters.
    Without heads (U-Net, per_head off) the table has only its header, so every evaluation writes
    the same files."""
    rows = []
    for runner in runners:
        for head in runner.names:
            row: dict[str, Any] = {
                "head": head,
                "dice": float(np.mean([c.dice for c in head_scores[head]])),
                "iou": float(np.mean([c.iou for c in head_scores[head]])),
            }
            if runner.parameters is not None:
                row.update(seconds=runner.seconds, parameters=runner.parameters)
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["head", "dice", "iou"])


def head_metrics(heads: pd.DataFrame) -> dict[str, float]:
    """heads.csv as flat metrics: head_L1_dice, head_L1_seconds, side_3_iou, fused_dice, ..."""
    out: dict[str, float] = {}
    for row in heads.to_dict("records"):
        for metric in ("dice", "iou", "seconds"):
            if metric in row:
                out[head_metric_name(row["head"], metric)] = float(row[metric])
    return out


def log_run(tracker: Any, summary: Mapping[str, Any], metrics: Mapping[str, float], out_dir: Path,
            heads: pd.DataFrame) -> None:
    """MLflow: test_<metric> for every test metric, head metrics, threshold and timing; artifacts."""
    logged = {f"test_{k}": v for k, v in metrics.items() if not math.isnan(v)}
    logged.update(head_metrics(heads))
    for key in ("threshold_best", "val_best_f1", "inference_seconds", "seconds"):
        if isinstance(summary.get(key), float):
            logged[key] = summary[key]
    tracker.log_metrics(logged)
    for name in ("metrics.json", "per_image.csv", "roc.csv", "pr.csv") + (() if heads.empty else ("heads.csv",)):
        tracker.log_artifact(str(out_dir / name))
    if any((out_dir / "overlays").iterdir()):
        tracker.log_artifacts(str(out_dir / "overlays"), "overlays")


def summary_text(summary: Mapping[str, Any], heads: pd.DataFrame) -> str:
    """The short table printed at the end of `segpipe evaluate`."""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}"

    columns = [("", f"t = {summary['threshold']:g}")]
    if "threshold_best" in summary:
        columns.append(("_best", f"val-best t = {summary['threshold_best']:.3f}"))
    rows = [("Dice (mean)", "dice"), ("IoU (mean)", "iou"), ("F1 (pooled)", "pooled_f1"),
            ("accuracy (pooled)", "pooled_accuracy"), ("sensitivity (pooled)", "pooled_sensitivity"),
            ("specificity (pooled)", "pooled_specificity"), ("SEG", "seg")]
    table = {label: [fmt(summary.get(key + suffix)) for suffix, _ in columns]
             for label, key in rows if key in summary}
    free = [("AUC-ROC (pooled)", "pooled_auc"), ("maxF_beta", "maxf"), ("MAE (mean)", "mae"),
            ("2nd observer F1 (pooled)", "observer2_pooled_f1")]
    table.update({label: [fmt(summary[key])] + [""] * (len(columns) - 1) for label, key in free if key in summary})
    text = pd.DataFrame.from_dict(table, orient="index", columns=[c for _, c in columns]).to_string()
    head = (f"{summary['dataset']}/{summary['network']} ({summary['network_used']}, epoch "
            f"{summary['checkpoint_epoch']}): {summary['test_images']} test images, "
            f"{summary['seconds']:.1f} s ({summary['inference_seconds']:.1f} s inference)")
    parts = [head, text]
    if not heads.empty:
        parts.append(heads.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return "\n".join(parts)
