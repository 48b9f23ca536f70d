"""The `evaluate` stage: a trained network on the test split (`segpipe evaluate DATASET NETWORK`).

Reads models/<dataset>/<network>/best.pt (configs/train.yaml: models_dir), normalises every image
as the checkpoint records (`preprocess(dataset, image, ckpt["augment"])`) and predicts whole images
with the project's sliding-window inference (`pipeline.inference.predict`, configs/inference.yaml
with the overrides of configs/evaluate.yaml, intensity "none"). Writes, each file atomically,
results/<dataset>/<network>/ (configs/evaluate.yaml: results_dir):

    metrics.json          means over test images and pooled-pixel values (`dvc metrics`)
    per_image.csv         one row per test image
    roc.csv, pr.csv       pooled test ROC (fpr, tpr) and PR (recall, precision) curves (`dvc plots`)
    heads.csv             deep-supervised networks: Dice/IoU per head (see "Heads"); others: header only
    timings.json          wall times (seconds, inference_seconds, per-head seconds): kept out of
                          metrics.json so that `dvc metrics diff` compares results, not the machine
    mlflow.json           the MLflow run of this evaluation (run_id, experiment_id, tracking_uri), read
                          by `segpipe report`; also kept out of metrics.json
    overlays/<case>.png   the image with true positives green, false positives red, false negatives blue
                          (K > 2 classes: reference | prediction, each class in its colour)

Metrics (`pipeline.metrics`), inside the field of view when the dataset has one (DRIVE, a folder's
masks, the pixels not at the card's ignore_value), else on all pixels. Two classes: the foreground
probability is the sigmoid output for one channel and 1 - P(background) for a softmax (channel 0 =
background); a pixel is foreground iff probability >= threshold.

    dice, iou                mean over test images at `threshold` (every dataset)
    mean_<s>, pooled_<s>     s in f1, accuracy, sensitivity, specificity, precision (pooled also
                             iou): mean over images (undefined per-image ratios skipped), or one
                             confusion over all test pixels, as the DRIVE literature reports them
    <key>_best               the same at the best-F1 threshold picked on the validation split
                             (`best_f1_threshold` on its pooled pixels): `threshold_best`, `val_best_f1`;
                             a cross-validation checkpoint's on its fold's validation cases (`fold`,
                             null for the prepare split)
    mean_auc, pooled_auc     AUC-ROC per image (mean) and over all test pixels
    maxf, maxf_threshold, mae  U2-Net (Qin et al. 2020, sec. 4.2): maxF_beta (beta^2 = 0.3) over the
                             test images, MAE per image (mean); computed for every network
    seg, mean_seg            cells (reference `instances`): CTC SEG of the instance maps `segpipe infer`
                             writes (the checkpoint's `instances` settings, chosen on validation:
                             `instances`, `val_seg`; a checkpoint without them: the connected
                             components of the thresholded prediction, `label_instances`), the mean
                             Jaccard over all reference objects of the test set (the challenge's, and
                             the U-Net paper's Table 2 "IOU"), and the mean of per-image SEG;
                             `seg_best` the components at the validation threshold
    seg_components           with instance settings: SEG of the connected components at `threshold`
    ap50, mean_ap50          average precision at IoU 0.5 of the instance maps (StarDist, Cellpose):
                             TP / (TP + FP + FN) over all test objects, and its mean over images
    rand_error, vi           adapted Rand error and variation of information (bits), mean over images
    observer2_*              DRIVE's second observer (`label2`) against the reference: a human
                             reference row (pooled and mean F1, accuracy, sensitivity, specificity)

K > 2 classes (the card's; `pipeline.evaluation.scoring`): the label map is the argmax of the K
softmax channels; every class c (its name, `classes` in metrics.json) scored one-vs-rest, background
included. per_image.csv: dice_<c>, iou_<c>, dice_mean_fg, iou_mean_fg (mean over the foreground
classes 1..K-1), accuracy (pixel accuracy), seconds. metrics.json: the same as means over the test
images, dice and iou (= dice_mean_fg, iou_mean_fg: the headline, as training's val_dice),
mean_accuracy, and pooled_<key> of one confusion per class over all test pixels. No threshold,
AUC-ROC, ROC/PR curves (header-only roc.csv, pr.csv), maxF, MAE, CTC SEG or second observer.

Heads (configs/evaluate.yaml: per_head), Dice/IoU at `threshold` (K > 2: the foreground classes'
mean Dice/IoU of the argmax), mean over test images, for the
heads the network names (`SegmentationNetwork.head_views`; `pipeline.evaluation.heads`): UNet++
L1..Lp (head_L<p>_dice, with seconds and parameters per level), U2-Net S1..S6 and fused
(side_<k>_dice, fused_dice).
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
from typing import Any, Mapping

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.data.io import write_text
from pipeline.data.prepared import PreparedDataset
from pipeline.errors import SegpipeError
from pipeline.evaluation.heads import HeadRunner, Reduce, head_metrics, head_runners, heads_table
from pipeline.evaluation.overlays import write_png
from pipeline.evaluation.scoring import BinaryScoring, Case, ClassScoring, Scoring, check_classes
from pipeline.evaluation.settings import EvaluateSettings
from pipeline.evaluation.summary import summary_text
from pipeline.files import atomic_path, file_mode, remove_stale_temps, temp_prefix
from pipeline.inference.backends.torch_graph import InferenceNetwork, torch_network
from pipeline.inference.engine.sliding_window import predict
from pipeline.inference.settings import InferenceSettings
from pipeline.metrics import best_f1_threshold
from pipeline.networks import SegmentationNetwork, load_model, read_checkpoint
from pipeline.postprocessing.instances import InstanceSettings
from pipeline.tracking import TrackingSettings, run_record, stage_run
from pipeline.tracking_datasets import DataInput
from pipeline.transforms.presets import preprocess

TIMINGS = ("inference_seconds", "seconds")
"""Wall times: in timings.json (and MLflow), never in metrics.json, which DVC compares."""


def load_trained(path: Path, dataset: str, network: str) -> tuple[SegmentationNetwork, dict[str, Any]]:
    """(network in eval mode, checkpoint dict) of a `segpipe train` checkpoint for `dataset`."""
    if not path.is_file():
        raise SegpipeError(f"{path}: no trained model found; run `segpipe train {dataset} {network}` first")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("augment"), dict):
        raise SegpipeError(
            f"{path}: checkpoint lacks 'augment' (the preprocessing of training); expected a "
            f"checkpoint written by `segpipe train {dataset} {network}`"
        )
    if ckpt.get("dataset", dataset) != dataset:
        raise SegpipeError(f"{path}: checkpoint was trained on {ckpt['dataset']!r}, not on {dataset!r}")
    return load_model(path), ckpt


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in place of `final` (the old one is removed after the rename)."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=f".{final.name}.old", dir=final.parent))
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
class _Predictor:
    """The main network's inference graph, the checkpoint's preprocessing and how its probabilities
    are reduced to what is scored (`reduce`: foreground probability, or label map for K > 2)."""

    dataset: str
    net: InferenceNetwork
    augment: dict[str, Any]
    settings: InferenceSettings
    reduce: Reduce
    seconds: float = field(default=0.0)

    def inputs(self, case: Case) -> np.ndarray:
        return preprocess(self.dataset, case.image, self.augment)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """The probabilities (K, H, W) of a preprocessed image; adds to `seconds`."""
        t0 = time.perf_counter()
        out = predict(self.net, x, settings=self.settings)
        self.seconds += time.perf_counter() - t0
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The reduced probabilities (H, W) of a preprocessed image; adds to `seconds`."""
        return self.reduce(self.probabilities(x))


def pick_threshold(predictor: _Predictor, data: PreparedDataset, desc: str) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over the pooled validation pixels (inside the FOV)."""
    cases = data.cases("val")
    if not cases:
        raise SegpipeError(
            f"{data.manifest_path}: no validation cases to pick the threshold on; "
            "set val_threshold: false in configs/evaluate.yaml"
        )
    scores, truth = [], []
    for name in tqdm(cases, desc=desc, unit="image"):
        case = Case.load(data, name)
        s = predictor.scores(predictor.inputs(case))
        valid = np.ones(case.label.shape, bool) if case.mask is None else case.mask
        scores.append(s[valid])
        truth.append(case.foreground[valid])
    try:
        return best_f1_threshold(np.concatenate(scores), np.concatenate(truth))
    except SegpipeError as exc:
        raise SegpipeError(f"{data.manifest_path}: validation split: {exc}") from exc


def evaluate_checkpoint(
    path: Path,
    data: PreparedDataset,
    network: str,
    cfg: EvaluateSettings,
    settings: InferenceSettings,
    out_dir: Path,
    *,
    tracking: TrackingSettings | None = None,
) -> dict[str, Any]:
    """Score the checkpoint `path` on the test split of `data` and write `out_dir` (module docstring).

    `network` is the DVC matrix name (unet, unetpp, u2net); the checkpoint may hold another
    registry network (u2netp), reported as `network_used`. Logs one MLflow "evaluate" run (test split,
    and the validation split when it picks the threshold, as dataset inputs; `tracking`:
    configs/tracking.yaml) and writes its ids to mlflow.json, outside metrics.json.
    """
    start, dataset = time.perf_counter(), data.name
    model, ckpt = load_trained(path, dataset, network)
    data = data.with_fold(ckpt.get("fold"))  # a cross-validation model: its fold's val cases pick the threshold
    classes = check_classes(path, ckpt, model.out_channels, data)
    multiclass = len(classes) > 2
    test_cases = data.cases("test")
    if not test_cases:
        raise SegpipeError(f"{data.manifest_path}: no test cases")
    facts = {
        "path": str(path),
        "network": ckpt["network"],
        "profile": ckpt.get("profile", ""),
        "epoch": ckpt.get("epoch", ""),
        "val_dice": ckpt.get("val_dice", ""),
        "fold": ckpt.get("fold"),
    }
    params = {"evaluate": asdict(cfg), "checkpoint": facts, "inference": asdict(settings)}
    tag = f"{dataset}/{network}"
    use_val = cfg.val_threshold and not multiclass  # the best-F1 threshold: two classes only
    inputs = [DataInput(data.manifest_path, dataset, "test", "testing")] + (
        [DataInput(data.manifest_path, dataset, "val", "validation", ckpt.get("fold"))] if use_val else []
    )
    with stage_run(
        "evaluate",
        dataset,
        params=params,
        manifest=data.manifest_path,
        network=network,
        datasets=inputs,
        tracking=tracking,
    ) as tracker:
        reduce = (ClassScoring if multiclass else BinaryScoring).reduce
        predictor = _Predictor(dataset, torch_network(model, settings), ckpt["augment"], settings, reduce)
        scoring, scoring_facts = _scoring(predictor, data, cfg, classes, tag, ckpt.get("instances"), str(path))
        predictor.seconds = 0.0
        runners = head_runners(model, replace(settings, tta=()), reduce) if cfg.per_head else []  # heads: no TTA
        n_overlays = len(test_cases) if cfg.overlays is None else min(cfg.overlays, len(test_cases))
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)  # the overlay folders of a killed evaluation
        overlay_tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".overlays", dir=out_dir))
        os.chmod(overlay_tmp, file_mode(directory=True))  # mkdtemp makes 0700; results are ordinary folders
        try:
            head_scores = _score_test_split(data, predictor, scoring, runners, n_overlays, overlay_tmp, tag)
            metrics = scoring.metrics()
            heads = heads_table(runners, head_scores)
            summary: dict[str, Any] = {
                "dataset": dataset,
                "network": network,
                "network_used": ckpt["network"],
                "checkpoint": str(path),
                "checkpoint_epoch": ckpt.get("epoch"),
                "checkpoint_val_dice": ckpt.get("val_dice"),
                "fold": ckpt.get("fold"),
                "test_images": len(test_cases),
                **scoring_facts,
            }
            per_head = head_metrics(runners, heads, ("dice", "iou"))
            summary = {k: json_safe(v) for k, v in {**summary, **metrics, **per_head}.items()}
            timings = {
                "inference_seconds": predictor.seconds,
                **head_metrics(runners, heads, ("seconds",)),
                "seconds": time.perf_counter() - start,
            }
            _write_results(out_dir, scoring, cfg.curve_points, heads, overlay_tmp, summary, timings)
        finally:
            shutil.rmtree(overlay_tmp, ignore_errors=True)
        if tracker is not None:
            log_run(tracker, summary, {**metrics_logged(metrics), **per_head, **timings}, out_dir, not heads.empty)
        # which MLflow run this is, for `segpipe report`: not in metrics.json, which must not change between runs
        write_text(out_dir / "mlflow.json", json.dumps(run_record(tracker), indent=2) + "\n")
    print(summary_text(summary, timings, heads))
    return {**summary, **timings}


def _scoring(
    predictor: _Predictor,
    data: PreparedDataset,
    cfg: EvaluateSettings,
    classes: list[str],
    tag: str,
    objects_record: Mapping[str, Any] | None = None,
    where: str = "checkpoint",
) -> tuple[Scoring, dict[str, Any]]:
    """The scoring of the test split and its facts for metrics.json: K > 2 classes, `classes` (their
    names in the keys); two classes, `threshold` and, when val_threshold, the best-F1 threshold picked
    on the validation split (`threshold_best`, `val_best_f1`); with the checkpoint's instance settings
    (`objects_record`, as `choose_instances` records them) SEG is that of the instance maps `segpipe
    infer` writes (`instances`, `val_seg`)."""
    objects = InstanceSettings.from_dict(objects_record["settings"], where) if objects_record else None
    if len(classes) > 2:
        scoring = ClassScoring(classes)
        return scoring, {"classes": scoring.tally.keys}
    thresholds = {"": float(cfg.threshold)}
    facts: dict[str, Any] = {"threshold": thresholds[""]}
    if cfg.val_threshold:
        thresholds["_best"], val_f1 = pick_threshold(predictor, data, f"{tag} val")
        facts.update(threshold_best=thresholds["_best"], val_best_f1=val_f1)
    if objects is not None:
        facts.update(instances=objects.describe(), val_seg=objects_record["val_seg"])
    return BinaryScoring(thresholds, objects), facts


def _score_test_split(
    data: PreparedDataset,
    predictor: _Predictor,
    scoring: Scoring,
    runners: list[HeadRunner],
    n_overlays: int,
    overlay_dir: Path,
    tag: str,
) -> dict[str, list[tuple[float, float]]]:
    """Every test image into `scoring` (the main output); returns the (Dice, IoU) of every image per head;
    the first `n_overlays` overlays written to `overlay_dir`."""
    head_scores: dict[str, list[tuple[float, float]]] = {label: [] for r in runners for label in r.view.labels}
    for i, name in enumerate(tqdm(data.cases("test"), desc=f"{tag} test", unit="image")):
        case = Case.load(data, name)
        x = predictor.inputs(case)
        before = predictor.seconds
        probs = predictor.probabilities(x)
        out = predictor.reduce(probs)
        scoring.add(case, out, predictor.seconds - before, probs)
        for runner in runners:
            t0 = time.perf_counter()
            per_head = runner.run(x)
            runner.seconds += time.perf_counter() - t0
            for label, head_out in zip(runner.view.labels, per_head):
                head_scores[label].append(scoring.head_score(case, head_out))
        if i < n_overlays:
            write_png(overlay_dir / f"{name}.png", scoring.overlay(case, out))
    return head_scores


def _write_results(
    out_dir: Path,
    scoring: Scoring,
    curve_points: int,
    heads: pd.DataFrame,
    overlay_tmp: Path,
    summary: Mapping[str, Any],
    timings: Mapping[str, float],
) -> None:
    """results/<dataset>/<network>/, each file atomically; metrics.json last (the run is complete)."""
    roc, pr = scoring.curves(curve_points)
    write_csv(out_dir / "per_image.csv", scoring.table())
    write_csv(out_dir / "roc.csv", roc)
    write_csv(out_dir / "pr.csv", pr)
    write_csv(out_dir / "heads.csv", heads)
    replace_dir(overlay_tmp, out_dir / "overlays")
    write_text(out_dir / "timings.json", json.dumps(timings, indent=2) + "\n")
    write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")


def metrics_logged(metrics: Mapping[str, float]) -> dict[str, float]:
    """Test metrics as MLflow logs them: test_<metric>, undefined (NaN) values left out."""
    return {f"test_{k}": v for k, v in metrics.items() if not math.isnan(v)}


def log_run(
    tracker: Any, summary: Mapping[str, Any], logged: Mapping[str, float], out_dir: Path, has_heads: bool
) -> None:
    """MLflow: the `logged` metrics, the thresholds; metrics.json, timings.json, the CSVs, overlays."""
    extra = {k: summary[k] for k in ("threshold_best", "val_best_f1") if isinstance(summary.get(k), float)}
    tracker.log_metrics({**logged, **extra})
    heads = ("heads.csv",) if has_heads else ()
    for name in ("metrics.json", "timings.json", "per_image.csv", "roc.csv", "pr.csv", *heads):
        tracker.log_artifact(str(out_dir / name))
    if any((out_dir / "overlays").iterdir()):
        tracker.log_artifacts(str(out_dir / "overlays"), "overlays")
