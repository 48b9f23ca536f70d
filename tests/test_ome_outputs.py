"""Viewer outputs of `segpipe infer`: pyramidal OME-TIFF and OME-Zarr (levels, tiles, downsampling,
physical pixel size, channel and class names), read back by tifffile and ome-zarr's reader, written
streamed (atomic, bounded memory), directly and end to end."""

from __future__ import annotations

import logging
import os
import stat
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import load_settings, predict, predict_file
from pipeline.inference.readers.images import ImageMeta
from pipeline.inference.writers.formats import output_paths
from pipeline.inference.writers.ome_meta import PixelSize, name_classes, pixel_size
from pipeline.inference.writers.ome_tiff import LABEL_VALUES_NAMESPACE, OmeTiffWriter
from pipeline.inference.writers.ome_zarr import OmeZarrWriter
from pipeline.inference.writers.pyramid import Pyramid, halve, level_shapes

from fixtures import Exploding

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")  # ome_zarr import
torch.set_num_threads(1)
H, W = 150, 101
OME_PIXELS = {"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.25, "PhysicalSizeYUnit": "µm"}
NAMES = ["background", "nucleus", "membrane"]


def _unet(cout: int = 2, seed: int = 0) -> nn.Module:
    from pipeline.networks import build_network

    torch.manual_seed(seed)
    return build_network("unet", 3, cout, padding="same", base_width=4, depth=2, batch_norm=False, dropout=0.0).eval()


def _labels(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, (1, h, w), dtype=np.uint8)


def _write(writer: OmeTiffWriter | OmeZarrWriter, data: np.ndarray, band: int = 7) -> Path:
    for y in range(0, data.shape[1], band):
        writer.write(y, data[:, y : y + band])
    writer.finish()
    return writer.publish()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cascade(data: np.ndarray, mode: str, levels: int) -> list[np.ndarray]:
    """The levels, from the whole image in memory (an odd last row paired with itself)."""
    out = [data]
    for _ in range(levels - 1):
        last = out[-1]
        if last.shape[1] % 2:
            last = np.concatenate([last, last[:, -1:]], axis=1)
        out.append(halve(last, mode))
    return out


def _ome_nodes(path: Path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    logging.getLogger("ome_zarr").setLevel(logging.ERROR)  # a standalone label map has "no parent image"
    return list(Reader(parse_url(str(path)))())


def test_level_shapes_and_downsampling():
    assert level_shapes(4096, 4096, 256) == [(4096, 4096), (2048, 2048), (1024, 1024), (512, 512), (256, 256)]
    assert level_shapes(H, W, 32) == [(150, 101), (75, 51), (38, 26), (19, 13)]
    assert level_shapes(20, 30, 32) == [(20, 30)]
    block = np.array([[[1, 2, 3], [4, 5, 7]]], np.uint8)
    np.testing.assert_array_equal(halve(block, "nearest"), [[[1, 3]]])
    np.testing.assert_array_equal(halve(block, "mean"), [[[3, 5]]])  # 12/4; the odd column pairs with itself: 20/4
    assert halve(block.astype(np.float16), "mean").dtype == np.float16


@pytest.mark.parametrize("mode", ["nearest", "mean"])
def test_pyramid_from_bands_equals_the_whole_image(mode):
    """Any band sizes, chunk rows handed on in order: the levels of the whole image."""
    data = np.random.default_rng(1).integers(0, 256, (2, H, W), dtype=np.uint8)
    shapes = level_shapes(H, W, 16)
    got = [np.full((2, h, w), 7, np.uint8) for h, w in shapes]
    calls: list[tuple[int, int, int]] = []

    def sink(k: int):
        def write(y0: int, block: np.ndarray) -> None:
            calls.append((k, y0, block.shape[1]))
            got[k][:, y0 : y0 + block.shape[1]] = block

        return write

    pyramid = Pyramid(shapes, 2, np.uint8, 16, mode, [sink(k) for k in range(len(shapes))])
    y = 0
    for band in (1, 5, 16, 3, 40, 2, 83):
        pyramid.push(data[:, y : y + band])
        y += band
    pyramid.close()
    for level, expected in zip(got, _cascade(data, mode, len(shapes))):
        np.testing.assert_array_equal(level, expected)
    for k, (h, _) in enumerate(shapes):
        assert [(y0, n) for kk, y0, n in calls if kk == k] == [(y0, min(16, h - y0)) for y0 in range(0, h, 16)]


def test_pixel_size_from_every_kind_of_metadata():
    assert pixel_size(ImageMeta(ome_pixels=OME_PIXELS)) == PixelSize(0.5, 0.25, "µm")
    assert pixel_size(
        ImageMeta(ome_pixels={"PhysicalSizeX": 2, "PhysicalSizeY": 1, "PhysicalSizeYUnit": "nm"})
    ) == PixelSize(2.0, 0.001, "µm")
    size = pixel_size(ImageMeta(resolution=((20000, 1), (10000, 1)), resolution_unit=3))  # pixels per cm
    assert size == PixelSize(0.5, 1.0, "µm") and size.pixels_per_cm(2) == (10000.0, 5000.0)
    assert pixel_size(ImageMeta(resolution=(254.0, 254.0), resolution_unit=2)) == PixelSize(100.0, 100.0, "µm")
    assert pixel_size(ImageMeta(resolution=((1, 1), (1, 1)), resolution_unit=1)) is None
    header = nib.Nifti1Image(np.zeros((3, 4, 5), np.uint8), np.diag([0.7, 0.6, 0.8, 1])).header
    assert pixel_size(ImageMeta(nifti_header=header)) == PixelSize(pytest.approx(0.8), pytest.approx(0.6), "mm")
    header.set_xyzt_units("micron")
    assert pixel_size(ImageMeta(nifti_header=header)).unit == "µm"
    assert pixel_size(ImageMeta(nifti_header=nib.Nifti1Image(np.zeros((4, 5), np.uint8), np.eye(4)).header)) is None
    assert pixel_size(ImageMeta()) is None
    assert name_classes(1) == ["class 0", "class 1"] and name_classes(3, NAMES) == NAMES
    with pytest.raises(SegpipeError, match="3 values.*give 3 distinct"):
        name_classes(3, ["a", "b"])


def _check_ome_tiff(path: Path, shapes: list, channels: int, dtype: str, tile: int) -> tifffile.TiffFile:
    """The structure of an OME pyramid: levels as SubIFDs of each channel's page, all tiled alike."""
    tif = tifffile.TiffFile(path)
    series = tif.series[0]
    assert tif.is_ome and tif.is_bigtiff and len(tif.pages) == channels
    assert [level.shape for level in series.levels] == [s if channels == 1 else (channels, *s) for s in shapes]
    assert series.axes == ("YX" if channels == 1 else "CYX")
    assert len(tif.pages[0].subifds) == len(shapes) - 1
    for level in series.levels:
        page = level.keyframe
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (tile, tile) and page.dtype == dtype
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    return tif


def test_ome_tiff_label_map_pyramid(tmp_path):
    data = _labels()
    path = _write(
        OmeTiffWriter(
            tmp_path / "seg.ome.tif",
            H,
            W,
            1,
            np.uint8,
            channel_names=["labels"],
            tile=32,
            meta=ImageMeta(ome_pixels=OME_PIXELS),
            label_names=NAMES,
        ),
        data,
    )
    with _check_ome_tiff(path, level_shapes(H, W, 32), 1, "uint8", 32) as tif:
        for k, level in enumerate(tif.series[0].levels):  # nearest: every 2^k-th pixel, no class invented
            np.testing.assert_array_equal(level.asarray(), data[0, :: 2**k, :: 2**k])
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
        pixels = ome["Image"]["Pixels"]
        assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"], pixels["PhysicalSizeXUnit"]) == (0.5, 0.25, "µm")
        assert pixels["Channel"]["Name"] == "labels" and ome["Image"]["Name"] == "seg"
        annotation = ome["StructuredAnnotations"]["MapAnnotation"]
        assert annotation["Namespace"] == LABEL_VALUES_NAMESPACE
        assert [(m["K"], m["value"]) for m in annotation["Value"]["M"]] == [
            (0, "background"),
            (1, "nucleus"),
            (2, "membrane"),
        ]
        level2 = tif.series[0].levels[2].keyframe.tags
        assert level2["XResolution"].value == (5000, 1) and level2["YResolution"].value == (10000, 1)  # per cm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.ome.tif"]  # no spool, no temp file left
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_ome_tiff_probabilities_pyramid(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (2, H, W), dtype=np.uint8)
    path = _write(
        OmeTiffWriter(
            tmp_path / "prob.ome.tif", H, W, 2, np.uint8, channel_names=NAMES[1:], tile=32, downsampling="mean"
        ),
        data,
        band=16,
    )
    shapes = level_shapes(H, W, 32)
    with _check_ome_tiff(path, shapes, 2, "uint8", 32) as tif:
        for level, expected in zip(tif.series[0].levels, _cascade(data, "mean", len(shapes))):
            np.testing.assert_array_equal(level.asarray(), expected)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert [c["Name"] for c in pixels["Channel"]] == ["nucleus", "membrane"] and "PhysicalSizeX" not in pixels
    with pytest.raises(SegpipeError, match="x.ome.tif: OME-TIFF cannot store float16"):
        OmeTiffWriter(tmp_path / "x.ome.tif", H, W, 2, np.float16, channel_names=["a", "b"])


def test_ome_zarr_label_map_and_probabilities(tmp_path):
    meta = ImageMeta(ome_pixels=OME_PIXELS)
    labels = _labels(seed=3)
    path = _write(
        OmeZarrWriter(
            tmp_path / "seg.ome.zarr",
            H,
            W,
            1,
            np.uint8,
            channel_names=["labels"],
            chunk=32,
            meta=meta,
            label_names=NAMES,
        ),
        labels,
    )
    shapes = level_shapes(H, W, 32)
    (node,) = _ome_nodes(path)
    assert [d.shape for d in node.data] == shapes and node.data[0].chunksize == (32, 32)
    for k, level in enumerate(node.data):
        np.testing.assert_array_equal(np.asarray(level), labels[0, :: 2**k, :: 2**k])
    assert [a["name"] for a in node.metadata["axes"]] == ["y", "x"]
    assert {a["unit"] for a in node.metadata["axes"]} == {"micrometer"}
    assert node.metadata["coordinateTransformations"] == [
        [{"type": "scale", "scale": [0.25 * 2**k, 0.5 * 2**k]}] for k in range(len(shapes))
    ]
    assert node.metadata["properties"] == {v: {"class": name} for v, name in enumerate(NAMES)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~_umask()

    probs = np.random.default_rng(4).random((2, H, W)).astype(np.float16)
    path = _write(
        OmeZarrWriter(
            tmp_path / "prob.ome.zarr",
            H,
            W,
            2,
            np.float16,
            channel_names=NAMES[1:],
            chunk=32,
            meta=meta,
            downsampling="mean",
        ),
        probs,
        band=32,
    )
    (node,) = _ome_nodes(path)
    assert node.data[0].chunksize == (1, 32, 32)
    for level, expected in zip(node.data, _cascade(probs, "mean", len(shapes))):
        assert level.dtype == np.float16
        np.testing.assert_array_equal(np.asarray(level), expected)
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "y", "x"]
    assert node.metadata["channel_names"] == ["nucleus", "membrane"]
    assert node.metadata["coordinateTransformations"][1] == [  # mean: pixel centres stay in place
        {"type": "scale", "scale": [1.0, 0.5, 1.0]},
        {"type": "translation", "translation": [0.0, 0.125, 0.25]},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prob.ome.zarr", "seg.ome.zarr"]


def test_ome_zarr_replaces_a_store_atomically_and_refuses_other_paths(tmp_path):
    first, second = _labels(seed=5), _labels(seed=6)
    target = tmp_path / "seg.ome.zarr"
    kwargs = dict(channel_names=["labels"], chunk=32, label_names=NAMES)
    _write(OmeZarrWriter(target, H, W, 1, np.uint8, **kwargs), first)
    writer = OmeZarrWriter(target, H, W, 1, np.uint8, **kwargs)
    writer.write(0, second[:, :50])
    writer.abort()  # an interrupted run: the old store is untouched, no temp directory left
    np.testing.assert_array_equal(np.asarray(_ome_nodes(target)[0].data[0]), first[0])
    _write(OmeZarrWriter(target, H, W, 1, np.uint8, **kwargs), second)
    np.testing.assert_array_equal(np.asarray(_ome_nodes(target)[0].data[0]), second[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.ome.zarr"]
    (tmp_path / "plain.ome.zarr").mkdir()
    with pytest.raises(SegpipeError, match="plain.ome.zarr: the output path exists and is not a zarr store"):
        OmeZarrWriter(tmp_path / "plain.ome.zarr", H, W, 1, np.uint8, **kwargs)
    with pytest.raises(SegpipeError, match="x.ome.zarr: OME-Zarr has no lzw codec"):
        OmeZarrWriter(tmp_path / "x.ome.zarr", H, W, 1, np.uint8, compression="lzw", **kwargs)
    writer = OmeZarrWriter(tmp_path / "short.ome.zarr", H, W, 1, np.uint8, **kwargs)
    writer.write(0, first[:, :10])
    with pytest.raises(SegpipeError, match="short.ome.zarr: only 10 of 150 rows"):
        writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.ome.zarr", "seg.ome.zarr"]


@pytest.mark.parametrize("cls,suffix", [(OmeTiffWriter, ".ome.tif"), (OmeZarrWriter, ".ome.zarr")])
def test_writer_memory_does_not_grow_with_the_image(tmp_path, cls, suffix):
    """A 4096 x 4096 label map (16 MB) written band by band: the traced peak (numpy buffers, codecs,
    tifffile's and zarr's threads) is a few tile rows, about the same as for a 1024-row image."""
    import ome_zarr.writer  # noqa: F401 -- imports are not the writer's memory
    import zarr  # noqa: F401

    width, band = 4096, 64
    rows = (np.arange(width) // 300 % 3).astype(np.uint8)[None, None].repeat(band, axis=1)  # compressible stripes
    peaks = []
    for height in (1024, 4096):
        writer = cls(
            tmp_path / f"{height}{suffix}",
            height,
            width,
            1,
            np.uint8,
            channel_names=["labels"],
            label_names=NAMES,
            **({"tile": 256} if cls is OmeTiffWriter else {"chunk": 256}),
        )
        tracemalloc.start()
        try:
            for y in range(0, height, band):
                writer.write(y, rows)
            writer.finish()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        writer.publish()
    # 4x the rows: at most a quarter of the image more (the peak moves by a few MB with how many chunks
    # tifffile's and zarr's threads happen to encode at once; a writer keeping the image grows by 12 MB)
    assert peaks[1] < peaks[0] + 4 * 2**20, peaks
    assert peaks[1] < 10 * 256 * width, peaks  # at most ten tile rows; the image is 16 tile rows


def _ome_input(tmp_path: Path, h: int = 70, w: int = 90) -> tuple[Path, np.ndarray]:
    image = np.random.default_rng(7).integers(0, 256, (3, h, w), dtype=np.uint8)
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, image, metadata={"axes": "CYX", **OME_PIXELS})
    return path, image


def test_predict_file_writes_ome_formats(tmp_path):
    src, image = _ome_input(tmp_path)
    net = _unet()
    expected = predict(net, image, tile=32)
    out = tmp_path / "out"
    seg, prob = output_paths(src, out, "ome-tiff")
    assert (seg.name, prob.name) == ("slide_seg.ome.tif", "slide_prob.ome.tif")
    report = predict_file(
        net,
        src,
        seg,
        probabilities_path=prob,
        tile=32,
        probabilities_dtype="float32",
        output_format="ome-tiff",
        class_names=["bg", "fg"],
    )
    assert report.outputs == [seg, prob]
    with tifffile.TiffFile(seg) as tif:
        assert len(tif.series[0].levels) == 1  # 70 x 90 fits one 256 tile
        np.testing.assert_array_equal(tif.series[0].asarray(), expected.argmax(0))
    np.testing.assert_array_equal(tifffile.imread(prob), expected)

    seg, prob = output_paths(src, out, "ome-zarr")
    predict_file(
        net, src, seg, probabilities_path=prob, tile=32, probabilities_dtype="float32", output_format="ome-zarr"
    )
    np.testing.assert_array_equal(np.asarray(_ome_nodes(seg)[0].data[0]), expected.argmax(0))
    (node,) = _ome_nodes(prob)
    np.testing.assert_array_equal(np.asarray(node.data[0]), expected)
    assert node.metadata["channel_names"] == ["class 0", "class 1"]
    assert node.metadata["coordinateTransformations"][0] == [{"type": "scale", "scale": [1.0, 0.25, 0.5]}]
    with pytest.raises(SegpipeError, match=r"x.tif: an ome-tiff output needs a name ending in \.ome\.tif"):
        predict_file(net, src, out / "x.tif", output_format="ome-tiff")
    assert sorted(p.name for p in out.iterdir()) == [
        "slide_prob.ome.tif",
        "slide_prob.ome.zarr",
        "slide_seg.ome.tif",
        "slide_seg.ome.zarr",
    ]


@pytest.mark.parametrize("output_format", ["ome-tiff", "ome-zarr"])
def test_interrupted_run_leaves_nothing_but_its_progress(tmp_path, output_format):
    src, _ = _ome_input(tmp_path)
    out = tmp_path / "out"
    seg, prob = output_paths(src, out, output_format)
    with pytest.raises(KeyboardInterrupt):
        predict_file(
            Exploding(_unet(), after=3),
            src,
            seg,
            probabilities_path=prob,
            tile=16,
            settings=load_settings(None, tiff_tile=16),
            output_format=output_format,
        )
    assert [p.name for p in out.iterdir()] == [f".{seg.name}.resume"]  # resumable (tests/test_resume.py)


def test_cli_infer_formats(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.networks import save_checkpoint

    ckpt = save_checkpoint(_unet(cout=3), tmp_path / "model.pt")
    src, image = _ome_input(tmp_path, 270, 200)  # two levels of 256-tiles
    expected = predict(ckpt, image, tile=32)
    out = tmp_path / "out"
    base = ["infer", "--model", str(ckpt), "--input", str(src), "--output", str(out), "--tile", "32", "--no-progress"]
    labels = expected.argmax(0)
    assert main([*base, "--format", "ome-tiff", "--class-names", ",".join(NAMES), "--save-probabilities"]) == 0
    with tifffile.TiffFile(out / "slide_seg.ome.tif") as tif:
        assert [level.shape for level in tif.series[0].levels] == [(270, 200), (135, 100)]
        for k, level in enumerate(tif.series[0].levels):
            np.testing.assert_array_equal(level.asarray(), labels[:: 2**k, :: 2**k])
        assert "membrane" in tif.ome_metadata
    with tifffile.TiffFile(out / "slide_prob.ome.tif") as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert [c["Name"] for c in pixels["Channel"]] == NAMES and pixels["PhysicalSizeY"] == 0.25
        encoded = np.rint(expected * 255).astype(np.uint8)
        for level, want in zip(tif.series[0].levels, _cascade(encoded, "mean", 2), strict=True):
            np.testing.assert_array_equal(level.asarray(), want)

    assert main([*base, "--format", "ome-zarr", "--class-names", ",".join(NAMES)]) == 0
    (node,) = _ome_nodes(out / "slide_seg.ome.zarr")
    assert node.metadata["properties"][2] == {"class": "membrane"} and len(node.data) == 2
    for k, level in enumerate(node.data):
        np.testing.assert_array_equal(np.asarray(level), labels[:: 2**k, :: 2**k])

    assert main([*base, "--format", "nifti"]) == 0
    assert main([*base, "--format", "tiff"]) == 0
    assert main(base) == 0  # auto: like the input, a flat OME-TIFF (replacing the pyramid of --format ome-tiff)
    assert sorted(p.name for p in out.iterdir()) == [
        "slide_prob.ome.tif",
        "slide_seg.nii.gz",
        "slide_seg.ome.tif",
        "slide_seg.ome.zarr",
        "slide_seg.tif",
    ]
    with tifffile.TiffFile(out / "slide_seg.ome.tif") as tif:
        assert len(tif.pages) == 1 and not tif.pages[0].subifds
        np.testing.assert_array_equal(tif.asarray(), labels)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "slide_seg.nii.gz")).dataobj)[0], labels)
    np.testing.assert_array_equal(tifffile.imread(out / "slide_seg.tif"), labels)
    capsys.readouterr()
    assert main([*base, "--format", "ome-zarr", "--class-names", "a,b"]) == 2
    assert "3 values (0..2), so give 3 distinct" in capsys.readouterr().err


def test_recorded_class_names_are_the_default(tmp_path):
    """The class names a checkpoint (and so its ONNX export) records name the OME outputs' classes unless
    --class-names says otherwise."""
    from pipeline.inference import export_onnx
    from pipeline.networks import save_checkpoint

    ckpt = save_checkpoint(_unet(cout=3), tmp_path / "model.pt", class_names=NAMES)
    model_onnx = export_onnx(ckpt)
    src, _ = _ome_input(tmp_path)
    for model in (ckpt, model_onnx):
        seg = tmp_path / "out" / f"{Path(model).suffix[1:]}_seg.ome.tif"
        predict_file(model, src, seg, tile=32, output_format="ome-tiff")
        assert _label_names(seg) == NAMES, model
    predict_file(ckpt, src, seg, tile=32, output_format="ome-tiff", class_names=["a", "b", "c"])
    assert _label_names(seg) == ["a", "b", "c"]


def _label_names(path: Path) -> list[str]:
    """The class names of an OME-TIFF label map's MapAnnotation, by value."""
    with tifffile.TiffFile(path) as tif:
        annotation = tifffile.xml2dict(tif.ome_metadata)["OME"]["StructuredAnnotations"]["MapAnnotation"]
    return [entry["value"] for entry in sorted(annotation["Value"]["M"], key=lambda e: e["K"])]


def test_chunk_spool_gives_back_every_block_and_removes_its_file(tmp_path):
    from pipeline.inference.writers.spool import ChunkSpool

    rng = np.random.default_rng(5)
    blocks = {
        (k, c, y): rng.random((7 if y else 32, 45)).astype(np.float32)
        for k in range(2)
        for c in range(2)
        for y in (0, 32)
    }
    spool = ChunkSpool(tmp_path / "s.spool", np.float32)
    for key, block in blocks.items():
        spool.put(key, block)
    for key in reversed(list(blocks)):
        np.testing.assert_array_equal(spool.get(key), blocks[key])
    spool.close()
    assert list(tmp_path.iterdir()) == []
