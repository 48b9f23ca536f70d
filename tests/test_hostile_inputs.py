"""Hostile inputs (issue "Reliability"): corrupt, truncated, lying, non-finite or oddly named files fail
with a SegpipeError naming the file, write nothing, and never stop the other inputs of a run; outputs
get ordinary permissions; `segpipe weightmap` survives huge instance ids and refuses NaN options."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import inference_network, load_settings, predict_file
from pipeline.transforms.presets import SCHEMA
from pipeline.transforms.weightmap import compact_ids, unet_weight_map

torch.set_num_threads(1)


def _unet(cin: int = 1, cout: int = 2, seed: int = 0) -> nn.Module:
    from pipeline.networks import build_network

    torch.manual_seed(seed)
    return build_network("unet", cin, cout, padding="same", base_width=2, depth=1, batch_norm=False, dropout=0.0).eval()


NET = inference_network(_unet(), load_settings(None))


def _zscore_checkpoint(tmp_path: Path) -> Path:
    from pipeline.networks import save_checkpoint

    def fill(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: fill(v) if isinstance(v, dict) else None for k, v in schema.items()}

    augment = {**fill(SCHEMA), "channels": None, "clahe": None, "normalize": "zscore"}
    return save_checkpoint(_unet(), tmp_path / "zscore.pt", dataset="drive", network_key="unet", augment=augment)


def _gray(h: int = 40, w: int = 48, dtype: Any = np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 200, (h, w)).astype(dtype)


def _truncate(path: Path, fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


TIFF_LAYOUTS = {
    "deflate_tiles": dict(tile=(16, 16), compression="zlib"),
    "lzw_strips": dict(rowsperstrip=8, compression="lzw"),
    "plain_strips": dict(rowsperstrip=8),
    "contiguous": dict(),
    "bigtiff_tiles": dict(bigtiff=True, tile=(16, 16)),
    "bigtiff_deflate_tiles": dict(bigtiff=True, tile=(16, 32), compression="zlib"),
}


def _no_outputs(out: Path) -> bool:
    return not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("layout", sorted(TIFF_LAYOUTS))
def test_truncated_tiff_names_the_file(tmp_path, layout):
    path = tmp_path / f"{layout}.tif"
    tifffile.imwrite(path, _gray(), **TIFF_LAYOUTS[layout])
    _truncate(path)
    with pytest.raises(SegpipeError, match=f"{layout}.tif: truncated TIFF"):
        predict_file(NET, path, tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")


@pytest.mark.parametrize("name", ["image.nii", "image.nii.gz"])
def test_truncated_nifti_names_the_file(tmp_path, name):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(_gray(dtype=np.float32), np.eye(4)), str(path))
    if name.endswith(".gz"):  # a complete gzip stream of a truncated .nii
        import gzip

        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    else:
        _truncate(path, 0.5)
    with pytest.raises(SegpipeError, match=f"{name}: truncated NIfTI"):
        predict_file(NET, path, tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")


def test_garbage_after_a_tiff_magic_says_what_was_expected(tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(b"II*\x00garbage")
    with pytest.raises(SegpipeError, match="scan.tif: cannot read as an image .*damaged or not a TIFF$"):
        predict_file(NET, path, tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    from pipeline.networks import load_model

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "x", "state_dict": Payload()}, tmp_path / "model.pt")
    with pytest.raises(SegpipeError, match="model.pt: not a readable segpipe checkpoint: expected a best.pt") as info:
        load_model(tmp_path / "model.pt")
    message = str(info.value)
    assert "never unpickles" in message and "GLOBAL" in message and "weights_only" not in message
    assert not marker.exists()


def test_headers_claiming_huge_images_are_refused_before_reading(tmp_path):
    tiff = tmp_path / "liar.tif"
    tifffile.imwrite(tiff, _gray(), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(tiff, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100000)
        tif.pages[0].tags["ImageLength"].overwrite(100000)
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000))  # NIfTI-1 dims are int16
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    buf = io.BytesIO()
    header.write_to(buf)
    nifti = tmp_path / "liar.nii"
    nifti.write_bytes(buf.getvalue().ljust(352, b"\0") + b"\0" * 4096)
    for path, what in ((tiff, "corrupt TIFF"), (nifti, "truncated NIfTI")):
        start = time.perf_counter()
        with pytest.raises(SegpipeError, match=f"{path.name}: {what}"):
            predict_file(NET, path, tmp_path / "out" / "seg.tif", tile=16)
        assert time.perf_counter() - start < 5


def test_corrupt_compressed_data_is_wrapped(tmp_path):
    path = tmp_path / "flipped.tif"
    tifffile.imwrite(path, _gray(), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[2], tif.pages[0].databytecounts[2]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count  # a tile of garbage, sizes intact
    path.write_bytes(bytes(data))
    with pytest.raises(SegpipeError, match="flipped.tif: cannot read rows .*\\(truncated or corrupt file"):
        predict_file(NET, path, tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")


def test_uint64_and_multi_size_pages_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "u64.tif", _gray(dtype=np.uint64))
    with pytest.raises(SegpipeError, match="u64.tif: pixel type uint64 is not supported"):
        predict_file(NET, tmp_path / "u64.tif", tmp_path / "out" / "seg.tif", tile=16)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        tif.write(_gray())
        tif.write(_gray(20, 24))
    with pytest.raises(SegpipeError, match=r"pages.tif: the TIFF holds 2 images of different sizes"):
        predict_file(NET, tmp_path / "pages.tif", tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")


# --- non-finite values ---------------------------------------------------------------------------


@pytest.mark.parametrize("case,count", [("one_nan", 1), ("all_nan", 40 * 48), ("inf", 3), ("huge64", 2)])
def test_nonfinite_input_is_an_error_with_the_count(tmp_path, case, count):
    image = _gray(dtype=np.float64 if case == "huge64" else np.float32)
    if case == "one_nan":
        image[5, 7] = np.nan
    elif case == "all_nan":
        image[:] = np.nan
    elif case == "inf":
        image[1, 1], image[30, 2], image[39, 47] = np.inf, -np.inf, np.inf
    else:
        image[0, 0], image[20, 20] = 1e300, -1e300
    path = tmp_path / f"{case}.tif"
    tifffile.imwrite(path, image)
    ckpt = _zscore_checkpoint(tmp_path)
    with pytest.raises(SegpipeError, match=f"{case}.tif: {count} pixel\\(s\\) hold non-finite values"):
        predict_file(ckpt, path, tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")
    report = predict_file(ckpt, path, tmp_path / "out" / "seg.tif", tile=16, nonfinite=0.0)
    assert f"{count} pixel(s) with non-finite values set to 0" in report.summary()
    with pytest.raises(SegpipeError, match="inference arguments: nonfinite must be null or a finite number"):
        predict_file(ckpt, path, tmp_path / "out" / "seg.tif", tile=16, nonfinite=float("nan"))


def test_nonfinite_replacement_equals_the_replaced_image(tmp_path):
    image = _gray(dtype=np.float32)
    image[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    image[3, 4] = 7.0
    tifffile.imwrite(tmp_path / "seven.tif", image)
    ckpt = _zscore_checkpoint(tmp_path)
    predict_file(ckpt, tmp_path / "nan.tif", tmp_path / "a.tif", probabilities_path=tmp_path / "pa.tif", nonfinite=7)
    predict_file(ckpt, tmp_path / "seven.tif", tmp_path / "b.tif", probabilities_path=tmp_path / "pb.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "pa.tif"), tifffile.imread(tmp_path / "pb.tif"))


def test_nonfinite_network_output_is_never_written(tmp_path):
    net = _unet()
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    tifffile.imwrite(tmp_path / "ok.tif", _gray())
    with pytest.raises(SegpipeError, match="ok.tif: the network's output is not finite"):
        predict_file(net, tmp_path / "ok.tif", tmp_path / "out" / "seg.tif", tile=16)
    assert _no_outputs(tmp_path / "out")


# --- outputs, names, settings ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("suffix", [".tif", ".nii", ".nii.gz"])
def test_outputs_have_ordinary_permissions(tmp_path, umask, suffix):
    nib.save(nib.Nifti1Image(_gray(dtype=np.float32), np.eye(4)), str(tmp_path / "in.nii"))
    old = os.umask(umask)
    try:
        report = predict_file(
            NET, tmp_path / "in.nii", tmp_path / f"seg{suffix}", probabilities_path=tmp_path / f"prob{suffix}", tile=16
        )
    finally:
        os.umask(old)
    for out in report.outputs:
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_that_is_a_directory(tmp_path):
    tifffile.imwrite(tmp_path / "in.tif", _gray())
    (tmp_path / "seg.tif").mkdir()
    with pytest.raises(SegpipeError, match="seg.tif: the output path exists and is a directory"):
        predict_file(NET, tmp_path / "in.tif", tmp_path / "seg.tif", tile=16)


def test_bad_device_and_huge_tile(tmp_path):
    tifffile.imwrite(tmp_path / "in.tif", _gray())
    with pytest.raises(SegpipeError, match="device 'tpu' is not supported: use cpu, cuda or cuda:N"):
        predict_file(_unet(), tmp_path / "in.tif", tmp_path / "seg.tif", device="tpu")
    start = time.perf_counter()
    with pytest.raises(SegpipeError, match=r"in.tif: tile 100000 .* on this 48 x 40 image needs about .* GB"):
        predict_file(NET, tmp_path / "in.tif", tmp_path / "seg.tif", tile=100000)
    assert time.perf_counter() - start < 5 and not (tmp_path / "seg.tif").exists()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from pipeline.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_cli_infer_goes_on_after_failures(tmp_path, capsys):
    from pipeline.networks import save_checkpoint

    ckpt = save_checkpoint(_unet(), tmp_path / "model.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a_trunc.tif", "c_good.tif"):
        tifffile.imwrite(inputs / name, _gray(), tile=(16, 16), compression="zlib")
    _truncate(inputs / "a_trunc.tif")
    nan = _gray(dtype=np.float32)
    nan[0, 0] = np.nan
    tifffile.imwrite(inputs / "b_nan.tif", nan)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "d_dir_seg.tif").mkdir()
    tifffile.imwrite(inputs / "d_dir.tif", _gray())
    code, err = _cli(
        [
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(inputs / "*.tif"),
            "--output",
            str(tmp_path / "out"),
            "--tile",
            "16",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2
    assert "a_trunc.tif: truncated TIFF" in err and "b_nan.tif: 1 pixel(s)" in err and "is a directory" in err
    assert "3 of 4 input(s) failed" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c_good_seg.tif", "d_dir_seg.tif"]
    code, err = _cli(
        [
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(inputs / "b_nan.tif"),
            "--output",
            str(tmp_path / "out"),
            "--tile",
            "16",
            "--no-progress",
            "--nonfinite",
            "0",
        ],
        capsys,
    )
    assert code == 0 and (tmp_path / "out" / "b_nan_seg.tif").is_file()
    code, err = _cli(
        [
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(inputs / "c_good.tif"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "tpu",
        ],
        capsys,
    )
    assert code == 2 and "device 'tpu' is not supported: use cpu, cuda or cuda:N" in err
    code, err = _cli(
        [
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(inputs / "c_good.tif"),
            "--output",
            str(tmp_path / "out"),
            "--tile",
            "100000",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and "tile 100000" in err and "GB" in err
    code, err = _cli(["infer", "--model", str(ckpt), "--input", "x.tif", "--output", "o", "--nonfinite", "nan"], capsys)
    assert code == 2 and "--nonfinite" in err


def test_names_with_brackets_and_long_names(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.networks import save_checkpoint

    ckpt = save_checkpoint(_unet(), tmp_path / "model.pt")
    bracket = tmp_path / "slide [1].tif"
    long = tmp_path / ("x" * 236 + ".tif")  # 240 characters; NAME_seg.tif has 244
    longer = tmp_path / ("y" * 248 + ".tif")  # NAME_seg.tif would have 256
    for path in (bracket, long, longer):
        tifffile.imwrite(path, _gray())
    out = tmp_path / "out"
    assert (
        main(
            [
                "infer",
                "--model",
                str(ckpt),
                "--input",
                str(bracket),
                "--input",
                str(long),
                "--output",
                str(out),
                "--tile",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(["slide [1]_seg.tif", "x" * 236 + "_seg.tif"])
    code, err = _cli(
        ["infer", "--model", str(ckpt), "--input", str(longer), "--output", str(out), "--tile", "16", "--no-progress"],
        capsys,
    )
    assert code == 2 and "file name is 256 bytes long" in err and "not writable" not in err, err[-300:]


# --- fuzz ------------------------------------------------------------------------------------------


def _valid_bytes(kind: str, h: int, w: int, seed: int) -> tuple[str, bytes]:
    image = _gray(h, w, seed=seed)
    buf = io.BytesIO()
    if kind == "nii":
        img = nib.Nifti1Image(image.astype(np.float32), np.eye(4))
        return "f.nii", img.to_bytes()
    if kind == "png":
        import imageio.v3 as iio

        return "f.png", iio.imwrite("<bytes>", image.astype(np.uint8), extension=".png")
    layout = TIFF_LAYOUTS[kind]
    tifffile.imwrite(buf, image, **layout)
    return "f.tif", buf.getvalue()


FUZZ_CASES = 300


@hyp_settings(
    max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(
    kind=st.sampled_from([*sorted(TIFF_LAYOUTS), "nii", "png"]),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4),
)
def test_fuzz_damaged_files_fail_cleanly(tmp_path_factory, kind, h, w, cut, flips):
    """Damaged small files (truncated anywhere, bytes overwritten anywhere): predict_file either
    succeeds or raises SegpipeError naming the file; it never leaves a temp file or a partial output."""
    folder = tmp_path_factory.mktemp("fuzz")
    name, data = _valid_bytes(kind, h, w, seed=h * 31 + w)
    raw = bytearray(data)
    for where, value in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] = value
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = folder / name
    path.write_bytes(bytes(raw))
    out = folder / "out"
    try:
        report = predict_file(NET, path, out / "seg.tif", probabilities_path=out / "prob.tif", tile=16)
    except SegpipeError as exc:
        assert str(path) in str(exc)
        assert _no_outputs(out)
    else:
        assert sorted(p.name for p in out.iterdir()) == ["prob.tif", "seg.tif"]
        assert report.shape[0] == 1


# --- weightmap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("big", [20_000_000, 2**32 + 5, 2**62 + 1, 2**64 - 2])
def test_weightmap_huge_ids_use_little_memory(big):
    import tracemalloc

    small = np.zeros((64, 64), np.int64)
    small[5:15, 5:15] = 1
    small[20:30, 18:28] = 2
    small[40:50, 40:60] = 3
    dtype = np.uint64 if big >= 2**63 else np.int64
    huge = small.astype(dtype)
    huge[small == 2] = big
    huge[small == 3] = big + 1
    tracemalloc.start()
    got = unet_weight_map(huge, class_weights=[1.0, 2.0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(got, unet_weight_map(small, class_weights=[1.0, 2.0]))
    assert peak < 20 * 2**20
    np.testing.assert_array_equal(compact_ids(huge), small)


def test_weightmap_refuses_non_finite_parameters(tmp_path, capsys):
    inst = np.zeros((16, 16), np.int32)
    inst[2:5, 2:5], inst[9:12, 9:12] = 1, 2
    for kwargs, key in (
        ({"sigma": float("nan")}, "sigma"),
        ({"w0": float("inf")}, "w0"),
        ({"w0": np.float32("nan")}, "w0"),
        ({"class_weights": [float("nan"), 1.0]}, "class_weights"),
    ):
        with pytest.raises(SegpipeError, match=f"{key} must be a finite number"):
            unet_weight_map(inst, **kwargs)
    tifffile.imwrite(tmp_path / "lab.tif", inst.astype(np.uint8))
    for option, value in (
        ("--sigma", "nan"),
        ("--w0", "nan"),
        ("--w0", "inf"),
        ("--sigma", "-1"),
        ("--class-weights", "nan,1"),
        ("--class-weights", "1,inf"),
    ):
        code, err = _cli(["weightmap", str(tmp_path / "lab.tif"), option, value], capsys)
        assert code == 2 and f"argument {option}" in err and "Traceback" not in err, err
    assert not (tmp_path / "lab_weight.tif").exists()
    code, _ = _cli(["weightmap", str(tmp_path / "lab.tif"), "--class-weights", "1,2", "--sigma", "3"], capsys)
    assert code == 0 and (tmp_path / "lab_weight.tif").is_file()
