"""`segpipe infer`'s instance maps (NAME_inst.*): streamed in blocks across tile and band borders,
ids consistent over the whole image, exactly what `segpipe evaluate` scores, in every output format,
recorded in checkpoints and ONNX metadata."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import infer_files, inference_network, load_settings, predict_file
from pipeline.inference.writers.formats import instance_path, output_paths
from pipeline.networks import build_network, save_checkpoint
from pipeline.postprocessing.instances import InstanceSettings, extract_instances
from pipeline.postprocessing.stitching import instances_of

torch.set_num_threads(1)
RECORD = {
    "settings": {"method": "watershed", "threshold": 0.5, "min_distance": 10, "halo": 48},
    "val_seg": 0.9,
    "candidates": 1,
}


class Oracle(nn.Module):
    """A network of the contract whose foreground probability is the (scaled) image itself."""

    def __init__(self) -> None:
        super().__init__()
        net = build_network("unet", 1, 1, base_width=4, depth=2, padding="same")
        for attr in (
            "padding",
            "halo",
            "in_channels",
            "out_channels",
            "output_size",
            "input_size",
            "valid_output_size",
        ):
            setattr(self, attr, getattr(net, attr))
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x - 0.5)


def touching_pairs() -> tuple[np.ndarray, np.ndarray]:
    """A 1-channel uint8 image (255 on discs) of touching disc pairs centred on 64-row tile borders
    and on the 96-row instance blocks' seams, and its reference ids."""
    h, w = 260, 150
    yy, xx = np.mgrid[:h, :w]
    ref = np.zeros((h, w), np.int64)
    centres = [(y, x) for y in (64, 96, 192) for x in (25, 61)] + [(128, 120), (150, 120)]
    for k, (cy, cx) in enumerate(centres, start=1):
        ref[((yy - cy) ** 2 + (xx - cx) ** 2 < 18**2) & (ref == 0)] = k
    return (255 * (ref > 0)).astype(np.uint8)[None], ref


def oracle_network() -> object:
    net = inference_network(Oracle(), load_settings(None))
    net.instances = RECORD
    return net


def test_streamed_instance_map_is_what_evaluation_scores_and_keeps_objects_whole(tmp_path: Path) -> None:
    image, ref = touching_pairs()
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, image[0])
    seg, prob = output_paths(src, tmp_path / "out")
    report = predict_file(
        oracle_network(),
        src,
        seg,
        probabilities_path=prob,
        instances_path=instance_path(seg),
        tile=64,
        probabilities_dtype="float32",
    )
    written = tifffile.imread(tmp_path / "out" / "cells_inst.tif")
    assert written.dtype == np.uint32 and written.shape == ref.shape
    probs = tifffile.imread(prob)[None]
    settings = InstanceSettings.from_dict(RECORD["settings"], "test")
    assert np.array_equal(written, instances_of(probs, settings))  # evaluation's instance maps, exactly
    whole = extract_instances(probs, settings)  # one block over the whole image
    assert written.max() == whole.max() == ref.max()
    for k in range(1, ref.max() + 1):  # every object one id, with the whole-image extraction's pixels
        ids = Counter(written[whole == k].tolist())
        assert len(ids) == 1 and next(iter(ids.values())) == (whole == k).sum()
    assert sorted(np.unique(written))[1:] == list(range(1, ref.max() + 1))
    assert any(f"{ref.max()} objects in cells_inst.tif (watershed: p >= 0.5" in note for note in report.notes)


@pytest.mark.parametrize("fmt,suffix", [("ome-tiff", ".ome.tif"), ("ome-zarr", ".ome.zarr"), ("nifti", ".nii.gz")])
def test_instance_maps_in_every_format(tmp_path: Path, fmt: str, suffix: str) -> None:
    image, ref = touching_pairs()
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, image[0])
    infer_files(oracle_network(), [str(src)], tmp_path / "out", show_progress=False, tile=64, output_format=fmt)
    path = tmp_path / "out" / f"cells_inst{suffix}"
    if fmt == "ome-tiff":
        with tifffile.TiffFile(path) as tif:
            data = tif.series[0].levels[0].asarray()
            assert "instances" in tif.ome_metadata
    elif fmt == "ome-zarr":
        group = zarr.open_group(str(path), mode="r")
        data = np.asarray(group["0"])
        assert group.attrs["image-label"]["properties"] == []
    else:
        import nibabel as nib

        data = np.asarray(nib.load(str(path)).dataobj)
    assert data.dtype == np.uint32 and data.max() == ref.max()


def test_instances_off_and_a_model_without_instance_settings(tmp_path: Path) -> None:
    image, _ = touching_pairs()
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, image[0])
    infer_files(oracle_network(), [str(src)], tmp_path / "off", show_progress=False, tile=64, instances="off")
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["cells_seg.tif"]
    plain = inference_network(Oracle(), load_settings(None))
    infer_files(plain, [str(src)], tmp_path / "auto", show_progress=False, tile=64)  # auto, nothing recorded
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["cells_seg.tif"]
    with pytest.raises(SegpipeError, match="records no instance settings"):
        predict_file(plain, src, tmp_path / "x_seg.tif", instances_path=tmp_path / "x_inst.tif", tile=64)
    assert not (tmp_path / "x_seg.tif").exists()


def test_checkpoint_and_onnx_carry_the_instance_settings(tmp_path: Path) -> None:
    from pipeline.inference import export_onnx

    torch.manual_seed(0)
    net = build_network("unet", 1, 1, base_width=4, depth=2, padding="same")
    ckpt = save_checkpoint(net, tmp_path / "best.pt", instances=RECORD, augment=None)
    assert inference_network(ckpt, load_settings(None)).instances == RECORD
    onnx_path = export_onnx(ckpt, tmp_path / "best.onnx")
    assert inference_network(onnx_path, load_settings(None, backend="onnxruntime")).instances == RECORD
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["segpipe.instances"]) == RECORD


def test_instance_path_names() -> None:
    assert instance_path(Path("o/a_seg.ome.tif")) == Path("o/a_inst.ome.tif")
    assert instance_path(Path("o/a.nii.gz")) == Path("o/a_inst.nii.gz")
