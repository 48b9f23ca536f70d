"""A fourth network, defined here, joins through the public registry and is trained and evaluated
with the smoke profile: losses, training and evaluation read its heads, nothing else knows it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.networks import HeadView, SegmentationNetwork, build_network, network_names, register_network
from pipeline.stages.evaluate import evaluate
from pipeline.stages.train import train
from pipeline.training.supervision import build_loss

from fixtures import FixtureProject, prepare_fixture_datasets


class TwoHeads(SegmentationNetwork):
    """One conv block, a main 1x1 head and an auxiliary 3x3 head whose losses are summed."""

    deep_supervision_mode = "sum"

    def __init__(self, in_channels: int, out_channels: int, *, width: int = 4) -> None:
        super().__init__("twoheads", {"width": width}, in_channels, out_channels, size_multiple=1)
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.main = nn.Conv2d(width, out_channels, 1)
        self.aux = nn.Conv2d(width, out_channels, 3, padding=1)

    def head_names(self) -> list[str]:
        return ["main", "aux"]

    def head_views(self) -> list[HeadView]:
        return [HeadView(("aux", "main"), ("twoheads_aux", "twoheads_main"), BothHeads(self))]

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.main(h), self.aux(h)

    def forward(self, x: torch.Tensor):
        main, aux = self.both(x)
        return (main, [aux]) if self.training else main


class BothHeads(SegmentationNetwork):
    """[aux | main] of a TwoHeads network."""

    def __init__(self, net: TwoHeads) -> None:
        super().__init__("twoheads-both", {}, net.in_channels, 2 * net.out_channels)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main, aux = self.net.both(x)
        return torch.cat([aux, main], dim=1)


def test_a_registered_network_trains_and_evaluates(project: FixtureProject) -> None:
    if "twoheads" not in network_names():
        register_network("twoheads", TwoHeads, {"width": 4})
    prepare_fixture_datasets(project, ("drive",))
    presets = project.root / "configs" / "networks.yaml"
    cfg = yaml.safe_load(presets.read_text())
    cfg["default"]["twoheads"] = {"width": 6}
    presets.write_text(yaml.safe_dump(cfg))

    net = build_network("twoheads", 1, 1, width=6)
    assert build_loss(network=net).mode == "sum"  # the network's own combination, no table elsewhere
    result = train("drive", "twoheads", profile="smoke")
    log = pd.read_csv(result.out_dir / "log.csv")
    assert len(log) == 2 and log["train_loss"].notna().all()
    saved = json.loads((result.out_dir / "config.json").read_text())
    assert saved["network"] == "twoheads" and saved["network_config"] == {"width": 6}

    metrics = evaluate("drive", "twoheads")
    heads = pd.read_csv(project.root / "results" / "drive" / "twoheads" / "heads.csv")
    assert list(heads["head"]) == ["aux", "main"]
    assert {"twoheads_aux_dice", "twoheads_main_iou"} <= set(metrics)
    assert 0.0 <= metrics["twoheads_main_dice"] <= 1.0 and metrics["network_used"] == "twoheads"


def test_head_weights_must_match_the_heads() -> None:
    if "twoheads" not in network_names():
        register_network("twoheads", TwoHeads, {"width": 4})
    with pytest.raises(SegpipeError, match=r"2 heads \['main', 'aux'\]"):
        build_loss({"head_weights": [1, 1, 1]}, network=build_network("twoheads", 1, 1))
