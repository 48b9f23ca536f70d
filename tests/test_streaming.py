"""`pipeline.inference.predict_file`: every format round trip equals `predict`, metadata kept,
atomic outputs, bad input, bounded memory, and `segpipe infer`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import load_settings, predict, predict_file
from pipeline.inference.readers.images import open_image
from pipeline.inference.writers.formats import output_paths

from fixtures import Exploding

torch.set_num_threads(1)
H, W = 70, 90


def _unet(cin: int = 3, cout: int = 2, padding: str = "same", seed: int = 0) -> nn.Module:
    from pipeline.networks import build_network

    torch.manual_seed(seed)
    net = build_network("unet", cin, cout, padding=padding, base_width=4, depth=2, batch_norm=True, dropout=0.0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _image(c: int = 3, dtype: type = np.uint8, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.random((c, h, w)).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, (c, h, w), endpoint=True).astype(dtype)


def _hwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, 0, -1))


# (file name, channels, dtype, writer) -- each writer stores a (C, H, W) array in one layout
WRITERS: list[tuple[str, int, type, Callable[[Path, np.ndarray], None]]] = [
    (
        "tiled_zlib.tif",
        3,
        np.uint8,
        lambda p, a: tifffile.imwrite(p, _hwc(a), tile=(32, 32), compression="zlib", photometric="rgb"),
    ),
    ("contiguous.tif", 3, np.uint8, lambda p, a: tifffile.imwrite(p, _hwc(a), photometric="rgb")),
    (
        "strips_lzw.tif",
        3,
        np.uint8,
        lambda p, a: tifffile.imwrite(p, _hwc(a), rowsperstrip=7, compression="lzw", photometric="rgb"),
    ),
    (
        "planar.tif",
        3,
        np.uint8,
        lambda p, a: tifffile.imwrite(
            p, a, planarconfig="separate", photometric="rgb", rowsperstrip=16, compression="zlib"
        ),
    ),
    (
        "bigtiff_tiles.tif",
        3,
        np.uint8,
        lambda p, a: tifffile.imwrite(p, _hwc(a), bigtiff=True, tile=(16, 48), photometric="rgb"),
    ),
    (
        "channels.ome.tif",
        3,
        np.uint8,
        lambda p, a: tifffile.imwrite(p, a, metadata={"axes": "CYX"}, tile=(32, 32), compression="zlib"),
    ),
    ("bigendian16.tif", 1, np.uint16, lambda p, a: tifffile.imwrite(p, a[0], byteorder=">", tile=(32, 32))),
    (
        "float.tif",
        2,
        np.float32,
        lambda p, a: tifffile.imwrite(
            p, _hwc(a), photometric="minisblack", planarconfig="contig", predictor=3, compression="zlib"
        ),
    ),
    ("image.nii.gz", 3, np.uint8, lambda p, a: nib.save(nib.Nifti1Image(a, np.eye(4)), str(p))),
    ("image.nii", 1, np.float32, lambda p, a: nib.save(nib.Nifti1Image(a[0], np.eye(4)), str(p))),
    ("rgb.png", 3, np.uint8, lambda p, a: iio.imwrite(p, _hwc(a))),
    ("gray16.png", 1, np.uint16, lambda p, a: iio.imwrite(p, a[0])),
    ("vector.mha", 3, np.uint8, lambda p, a: sitk.WriteImage(sitk.GetImageFromArray(_hwc(a), isVector=True), str(p))),
    ("scalar.nrrd", 1, np.int16, lambda p, a: sitk.WriteImage(sitk.GetImageFromArray(a[0]), str(p))),
]


def _read_output(path: Path) -> np.ndarray:
    """An output back as (K, H, W)."""
    if path.name.endswith((".nii", ".nii.gz")):
        data = np.asarray(nib.load(str(path)).dataobj)
        return data if data.ndim == 3 else data[None]
    data = tifffile.imread(path)
    return data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)


@pytest.mark.parametrize("name,channels,dtype,write", WRITERS, ids=[w[0] for w in WRITERS])
def test_predict_file_equals_predict_for_every_format(tmp_path, name, channels, dtype, write):
    image = _image(channels, dtype, seed=len(name))
    src = tmp_path / name
    write(src, image)
    net = _unet(cin=channels)
    seg, prob = output_paths(src, tmp_path / "out")
    report = predict_file(net, src, seg, probabilities_path=prob, tile=32, probabilities_dtype="float32")
    expected = predict(net, image, tile=32)
    assert report.outputs == [seg, prob] and report.shape == (channels, H, W)
    np.testing.assert_array_equal(_read_output(prob), expected)
    labels = _read_output(seg)
    assert labels.dtype == np.uint8 and labels.shape == (1, H, W)
    np.testing.assert_array_equal(labels[0], expected.argmax(0))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([seg.name, prob.name])


def test_jpeg_round_trip(tmp_path):
    src = tmp_path / "photo.jpg"
    iio.imwrite(src, _hwc(_image(3, seed=1)))
    decoded = np.moveaxis(iio.imread(src), -1, 0)
    net = _unet()
    predict_file(
        net, src, tmp_path / "seg.tif", probabilities_path=tmp_path / "prob.tif", tile=32, probabilities_dtype="float32"
    )
    np.testing.assert_array_equal(_read_output(tmp_path / "prob.tif"), predict(net, decoded, tile=32))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(compression="jpeg", tile=(32, 32), photometric="rgb"),  # slide-scanner style (YCbCr, subsampled)
        dict(compression="jpeg", rowsperstrip=16, photometric="rgb", subsampling=(1, 1)),
        dict(compression="zstd", tile=(16, 32), predictor=True, photometric="rgb"),
    ],
)
def test_lossy_and_other_codecs_read_like_tifffile(tmp_path, kwargs):
    tifffile.imwrite(tmp_path / "in.tif", _hwc(_image(3, seed=2)), **kwargs)
    decoded = np.moveaxis(tifffile.imread(tmp_path / "in.tif"), -1, 0)
    with open_image(tmp_path / "in.tif") as reader:
        np.testing.assert_array_equal(reader.read_rows(0, H), decoded)
        np.testing.assert_array_equal(reader.read_rows(17, 50), decoded[:, 17:50])


@pytest.mark.parametrize(
    "name", ["tiled_zlib.tif", "strips_lzw.tif", "planar.tif", "channels.ome.tif", "image.nii.gz", "vector.mha"]
)
def test_readers_give_any_row_band(tmp_path, name):
    _, channels, dtype, write = next(w for w in WRITERS if w[0] == name)
    image = _image(channels, dtype, seed=3)
    write(tmp_path / name, image)
    with open_image(tmp_path / name) as reader:
        assert reader.shape == image.shape and reader.dtype == image.dtype
        for start, stop in [(0, 1), (5, 38), (31, 33), (60, 70), (0, 70)]:
            np.testing.assert_array_equal(reader.read_rows(start, stop), image[:, start:stop])


def test_valid_unet_streamed_equals_whole_mirror_padded_image(tmp_path):
    net = _unet(padding="valid", seed=4)
    image = _image(3, seed=4, h=83, w=61)
    tifffile.imwrite(tmp_path / "in.tif", _hwc(image), tile=(16, 16), photometric="rgb")
    predict_file(
        net,
        tmp_path / "in.tif",
        tmp_path / "seg.tif",
        probabilities_path=tmp_path / "prob.tif",
        tile=24,
        batch_size=3,
        probabilities_dtype="float32",
    )
    halo, hh, ww = net.halo, net.valid_output_size(83), net.valid_output_size(61)
    x = np.pad(image.astype(np.float32) / 255, ((0, 0), (halo, halo + hh - 83), (halo, halo + ww - 61)), mode="reflect")
    with torch.inference_mode():
        whole = torch.softmax(net(torch.from_numpy(x)[None])[0, :, :83, :61], 0).numpy()
    np.testing.assert_allclose(_read_output(tmp_path / "prob.tif"), whole, atol=1e-5)


def test_probability_encodings_and_threshold(tmp_path):
    image = _image(3, seed=5)
    tifffile.imwrite(tmp_path / "in.tif", _hwc(image), photometric="rgb")
    net = _unet(cout=1, seed=5)
    expected = predict(net, image, tile=32)
    threshold = float(np.median(expected))  # half the pixels on each side: the threshold matters
    predict_file(
        net,
        tmp_path / "in.tif",
        tmp_path / "s8.tif",
        probabilities_path=tmp_path / "p8.tif",
        tile=32,
        probabilities_dtype="uint8",
        threshold=threshold,
    )
    np.testing.assert_array_equal(_read_output(tmp_path / "p8.tif"), np.rint(expected * 255).astype(np.uint8))
    labels = _read_output(tmp_path / "s8.tif")[0]
    np.testing.assert_array_equal(labels, (expected[0] >= threshold).astype(np.uint8))
    assert 0.3 < labels.mean() < 0.7
    predict_file(
        net,
        tmp_path / "in.tif",
        tmp_path / "s16.tif",
        probabilities_path=tmp_path / "p16.tif",
        tile=32,
        probabilities_dtype="float16",
    )
    p16 = _read_output(tmp_path / "p16.tif")
    assert p16.dtype == np.float16
    np.testing.assert_array_equal(p16, expected.astype(np.float16))


def test_spacing_and_metadata_are_kept(tmp_path):
    net = _unet()
    image = _image(3, seed=6)
    tifffile.imwrite(
        tmp_path / "res.tif", _hwc(image), photometric="rgb", resolution=(2.5, 4.0), resolutionunit="CENTIMETER"
    )
    predict_file(net, tmp_path / "res.tif", tmp_path / "res_seg.tif", tile=32)
    with tifffile.TiffFile(tmp_path / "res_seg.tif") as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled
        assert page.tags["ResolutionUnit"].value == 3
        assert page.tags["XResolution"].value == (5, 2) and page.tags["YResolution"].value == (4, 1)

    tifffile.imwrite(
        tmp_path / "ome.ome.tif",
        image,
        metadata={
            "axes": "CYX",
            "PhysicalSizeX": 0.5,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 0.25,
            "PhysicalSizeYUnit": "µm",
        },
    )
    seg, _ = output_paths(tmp_path / "ome.ome.tif", tmp_path)
    assert seg.name == "ome_seg.ome.tif"
    predict_file(net, tmp_path / "ome.ome.tif", seg, tile=32)
    with tifffile.TiffFile(seg) as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"], pixels["PhysicalSizeXUnit"]) == (0.5, 0.25, "µm")

    affine = np.array([[0.0, 0, 0.8, 10], [0, 0.6, 0, 20], [0.7, 0, 0, 30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "vol.nii.gz"))
    seg, prob = output_paths(tmp_path / "vol.nii.gz", tmp_path)
    assert (seg.name, prob.name) == ("vol_seg.nii.gz", "vol_prob.nii.gz")
    predict_file(net, tmp_path / "vol.nii.gz", seg, probabilities_path=prob, tile=32, probabilities_dtype="float32")
    for path, k in ((seg, 1), (prob, 2)):
        out = nib.load(str(path))
        np.testing.assert_allclose(out.affine, affine, atol=1e-6)
        assert out.shape == (k, H, W)
        np.testing.assert_allclose(out.header.get_zooms(), (0.7, 0.6, 0.8), atol=1e-6)

    iio.imwrite(tmp_path / "dpi.png", _hwc(image), dpi=(300, 150))
    predict_file(net, tmp_path / "dpi.png", tmp_path / "dpi_seg.tif", tile=32)
    with tifffile.TiffFile(tmp_path / "dpi_seg.tif") as tif:
        tags = tif.pages[0].tags
        assert tags["ResolutionUnit"].value == 2  # inch
        x, y = tags["XResolution"].value, tags["YResolution"].value
        assert abs(x[0] / x[1] - 300) < 0.01 and abs(y[0] / y[1] - 150) < 0.02

    itk = sitk.GetImageFromArray(_hwc(image), isVector=True)
    itk.SetSpacing((0.5, 0.25))  # mm
    sitk.WriteImage(itk, str(tmp_path / "sp.mha"))
    predict_file(net, tmp_path / "sp.mha", tmp_path / "sp_seg.tif", tile=32)
    with tifffile.TiffFile(tmp_path / "sp_seg.tif") as tif:
        tags = tif.pages[0].tags
        assert tags["ResolutionUnit"].value == 3
        assert tags["XResolution"].value == (20, 1) and tags["YResolution"].value == (40, 1)  # pixels per cm


@pytest.mark.parametrize("out_name", ["seg.tif", "seg.nii.gz"])
def test_interrupted_run_leaves_nothing_but_its_progress(tmp_path, out_name):
    image = _image(3, seed=7, h=150, w=40)
    tifffile.imwrite(tmp_path / "in.tif", _hwc(image), photometric="rgb")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict_file(
            Exploding(_unet(), after=3),
            tmp_path / "in.tif",
            out / out_name,
            probabilities_path=out / ("prob" + out_name[3:]),
            tile=32,
            batch_size=1,
            settings=load_settings(None, tiff_tile=16),
        )  # some tile rows reach the temp file
    assert [p.name for p in out.iterdir()] == [f".{out_name}.resume"]  # no output, no temp file (tests/test_resume.py)


@pytest.mark.filterwarnings("ignore:.*zero-size array:UserWarning")
def test_bad_input_names_the_file_and_writes_nothing(tmp_path):
    net = _unet()
    out = tmp_path / "out"
    for name in ("broken.tif", "broken.nii.gz", "broken.png", "broken.mha"):
        (tmp_path / name).write_bytes(b"this is not an image" * 10)
        with pytest.raises(SegpipeError, match=name):
            predict_file(net, tmp_path / name, out / "seg.tif", tile=32)
    with pytest.raises(SegpipeError, match="missing.tif: input image not found"):
        predict_file(net, tmp_path / "missing.tif", out / "seg.tif", tile=32)

    tifffile.imwrite(tmp_path / "gray.tif", _image(1, seed=0)[0])
    with pytest.raises(SegpipeError, match="gray.tif: the image has 1 channel.*expects 3"):
        predict_file(net, tmp_path / "gray.tif", out / "seg.tif", tile=32)

    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 0), np.uint8))
    nib.save(nib.Nifti1Image(np.zeros((3, 0, 5), np.uint8), np.eye(4)), str(tmp_path / "empty.nii.gz"))
    for name in ("empty.tif", "empty.nii.gz"):
        with pytest.raises(SegpipeError, match=f"{name}.*(zero-size|expected)"):
            predict_file(net, tmp_path / name, out / "seg.tif", tile=32)

    tifffile.imwrite(tmp_path / "ok.tif", _hwc(_image(3, seed=0)), photometric="rgb")
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(SegpipeError, match="a_file.*not writable"):
        predict_file(net, tmp_path / "ok.tif", tmp_path / "a_file" / "seg.tif", tile=32)
    with pytest.raises(SegpipeError, match="overwrite the input"):
        predict_file(net, tmp_path / "ok.tif", tmp_path / "ok.tif", tile=32)
    assert not out.exists() or list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            "broken.tif",
            "broken.nii.gz",
            "broken.png",
            "broken.mha",
            "gray.tif",
            "empty.tif",
            "empty.nii.gz",
            "ok.tif",
            "a_file",
        ]
        + (["out"] if out.exists() else [])
    )


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tifffile, torch
    torch.set_num_threads(1)
    from pipeline.inference import load_settings, predict, predict_file
    from pipeline.inference.engine.memory import peak_rss_mb, reset_peak_rss
    from pipeline.networks import build_network

    mode, folder = sys.argv[1], sys.argv[2]
    small_tiles = load_settings(None, tiff_tile=64)  # output strips of 64 rows
    torch.manual_seed(0)
    net = build_network("unet", 3, 2, padding="same", base_width=2, depth=1, batch_norm=False, dropout=0.0).eval()

    def write(path, size):
        rng = np.random.default_rng(size)
        tiles = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range((size // 64) ** 2))
        tifffile.imwrite(path, tiles, shape=(size, size, 3), dtype=np.uint8, tile=(64, 64), photometric="rgb")

    def run(size):
        path = f"{folder}/in_{size}.tif"
        write(path, size)
        assert reset_peak_rss()  # the peak from here on, not the imports' transient peak
        if mode == "stream":
            predict_file(net, path, f"{folder}/seg_{size}.tif", probabilities_path=f"{folder}/prob_{size}.tif",
                         probabilities_dtype="float32", tile=64, batch_size=8, settings=small_tiles)
        else:  # the in-memory way: whole image, whole float result
            probs = predict(net, np.moveaxis(tifffile.imread(path), -1, 0), tile=64, batch_size=8)
            tifffile.imwrite(f"{folder}/seg_{size}.tif", probs.argmax(0).astype(np.uint8))
        return peak_rss_mb()

    run(256)  # warm-up: imports, allocator, oneDNN primitives
    small = run(1024)
    large = run(2048)  # 4x the pixels
    print(json.dumps({"small": small, "large": large}))
    """
)


def _peak_growth(mode: str, folder: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, mode, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    return peaks["large"] - peaks["small"]


def test_peak_memory_does_not_grow_with_image_size(tmp_path):
    """4x the pixels: streaming (labels and float32 probabilities written) grows the peak by a few MB
    (the band is 2x wider); holding the image and its float result in memory grows it by tens of MB.
    The second shows the measurement sees growth (a writer buffering its output would too)."""
    limit_mb = 16
    (tmp_path / "stream").mkdir()
    (tmp_path / "memory").mkdir()
    assert _peak_growth("stream", tmp_path / "stream") < limit_mb
    assert _peak_growth("memory", tmp_path / "memory") > 2 * limit_mb


def test_cli_infer_several_inputs_model_loaded_once(tmp_path, monkeypatch, capsys):
    import pipeline.networks as networks
    from pipeline.cli import main
    from pipeline.networks import save_checkpoint

    ckpt = save_checkpoint(_unet(), tmp_path / "model.pt")
    calls = []
    real_load = networks.load_model
    monkeypatch.setattr(networks, "load_model", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    images = {}
    for i, name in enumerate(["a.tif", "b.tif", "c.png"]):
        images[name] = _image(3, seed=10 + i)
        (tifffile.imwrite if name.endswith(".tif") else iio.imwrite)(tmp_path / name, _hwc(images[name]))
    out = tmp_path / "out"
    code = main(
        [
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(tmp_path / "*.tif"),
            "--input",
            str(tmp_path / "c.png"),
            "--output",
            str(out),
            "--tile",
            "32",
            "--save-probabilities",
            "--probabilities-dtype",
            "float32",
            "--tta",
            "h",
            "--no-progress",
        ]
    )
    assert code == 0 and len(calls) == 1
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 3 and all("Mpx/s" in line and "peak RSS" in line and "90x70x3" in line for line in summary)
    for name, image in images.items():
        stem = name.split(".")[0]
        expected = predict(ckpt, image, tile=32, tta=("h",))
        np.testing.assert_array_equal(_read_output(out / f"{stem}_prob.tif"), expected)
        np.testing.assert_array_equal(_read_output(out / f"{stem}_seg.tif")[0], expected.argmax(0))

    (tmp_path / "bad.tif").write_bytes(b"garbage")
    code = main(
        [
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(tmp_path / "*.tif"),
            "--output",
            str(tmp_path / "out2"),
            "--tile",
            "32",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.tif" in err
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a_seg.tif", "b_seg.tif"]
    assert main(["infer", "--model", str(ckpt), "--input", str(tmp_path / "nothing*.tif"), "--output", str(out)]) == 2
