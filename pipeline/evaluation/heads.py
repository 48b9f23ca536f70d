"""Per-head scores of deep-supervised networks (configs/evaluate.yaml: per_head).

The network names the heads to score (`SegmentationNetwork.head_views`): UNet++ gives its pruned
networks L1..Lp (Zhou et al. 2018, Sec. 2 / Fig. 1c-d), U2-Net one network with its side outputs
S1..S6 and the fused output (Qin et al. 2020, Fig. 5). A view with one head is a network of its
own: it runs through the project's sliding-window `predict`, like the main network, and its time
and parameter count are reported. A view with several heads is blended with MONAI's
`sliding_window_inference` over the concatenated logits, with the windows, blending, batch size
and window-level TTA of `predict`, then split into its heads (K channels each). Each head's
probabilities are reduced as the main output's (`reduce`: the foreground probability for two
classes, the argmax label map for K > 2) and scored as Dice and IoU (for K > 2 the means over the
foreground classes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.inference.backends.torch_graph import InferenceNetwork, torch_network
from pipeline.inference.engine.sliding_window import predict, probabilities
from pipeline.inference.engine.tta import tta_logits
from pipeline.inference.settings import InferenceSettings
from pipeline.metrics import foreground
from pipeline.networks import HeadView, SegmentationNetwork

Reduce = Callable[[np.ndarray], np.ndarray]
"""Probabilities (K, H, W) -> what is scored (H, W): a foreground probability or a label map."""


def multi_head_scores(
    net: InferenceNetwork, image: np.ndarray, settings: InferenceSettings, heads: int, reduce: Reduce = foreground
) -> np.ndarray:
    """The reduced probabilities (heads, H, W) of a preprocessed image (C, H, W) through a network
    whose output is `heads` heads of K channels each (`HeadView`)."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            settings.tile,
            settings.batch_size,
            lambda w: tta_logits(net, w, settings.tta),
            overlap=settings.overlap,
            mode=settings.blend,
            sigma_scale=settings.sigma_scale,
        )[0].float()
    k = logits.shape[0] // heads
    return np.stack([reduce(probabilities(part).numpy()) for part in logits.split(k)])


@dataclass
class HeadRunner:
    """One inference pass giving the reduced probabilities (len(view.labels), H, W) of a view."""

    view: HeadView
    run: Callable[[np.ndarray], np.ndarray]
    separate: bool
    """A one-head view: a network of its own, whose seconds and parameters are reported."""
    parameters: int
    seconds: float = 0.0


def head_runners(model: SegmentationNetwork, settings: InferenceSettings, reduce: Reduce) -> list[HeadRunner]:
    """One runner per head view of `model` (none for a single-head network)."""
    runners = []
    for view in model.head_views():
        separate = len(view.labels) == 1
        if separate:
            net = torch_network(view.network, settings)
            run = lambda x, net=net: reduce(predict(net, x, settings=settings))[None]  # noqa: E731
        else:
            net = torch_network(view.network, replace(settings, compile=False))
            run = lambda x, net=net, n=len(view.labels): multi_head_scores(net, x, settings, n, reduce)  # noqa: E731
        runners.append(HeadRunner(view, run, separate, sum(p.numel() for p in view.network.parameters())))
    return runners


def heads_table(runners: list[HeadRunner], head_scores: Mapping[str, Sequence[tuple[float, float]]]) -> pd.DataFrame:
    """heads.csv: head, dice, iou (mean over test images of each head's (Dice, IoU) in `head_scores`);
    separate networks also seconds and parameters. Without heads (U-Net, per_head off) the table has
    only its header, so every evaluation writes the same files."""
    rows = []
    for runner in runners:
        for label in runner.view.labels:
            row: dict[str, object] = {
                "head": label,
                "dice": float(np.mean([dice for dice, _ in head_scores[label]])),
                "iou": float(np.mean([iou for _, iou in head_scores[label]])),
            }
            if runner.separate:
                row.update(seconds=runner.seconds, parameters=runner.parameters)
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["head", "dice", "iou"])


def head_metrics(runners: list[HeadRunner], heads: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, float]:
    """`columns` of heads.csv as flat metrics named by the network: head_L1_dice, side_3_iou, ..."""
    keys = {label: key for r in runners for label, key in zip(r.view.labels, r.view.keys)}
    return {
        f"{keys[row['head']]}_{c}": float(row[c])
        for row in heads.to_dict("records")
        for c in columns
        if c in row and not pd.isna(row[c])
    }
