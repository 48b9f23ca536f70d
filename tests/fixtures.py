"""Small datasets in the real archive layouts, built by the tests, and a local HTTP mirror.

Nothing here downloads anything: the mirror serves files from a temporary folder on 127.0.0.1,
supports HTTP Range, and can be told to cut a transfer after N bytes or to answer 500.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import tifffile
import torch
import yaml
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- archive builders -------------------------------------------------------------------------


def _tif_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def _gif_bytes(array: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", array, extension=".gif")


def disk_instances(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """uint16 instance image of disks (later disks overwrite earlier ones where they overlap)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.uint16)
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return inst


def drive_members(
    n_train: int = 5, n_test: int = 3, shape: tuple[int, int] = (48, 40), seed: int = 0
) -> dict[str, bytes]:
    """DRIVE's folder layout with RGB TIFF images and 0/255 GIF vessel and FOV masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fov = ((yy - shape[0] / 2) / (shape[0] / 2)) ** 2 + ((xx - shape[1] / 2) / (shape[1] / 2)) ** 2 <= 1.0
    members: dict[str, bytes] = {}
    cases = [("training", f"{21 + i:02d}") for i in range(n_train)] + [("test", f"{1 + i:02d}") for i in range(n_test)]
    for split, case in cases:
        vessels = np.zeros(shape, np.uint8)
        for _ in range(3):  # a few straight "vessels" 1-3 px wide
            if rng.random() < 0.5:
                r, w = rng.integers(2, shape[0] - 4), rng.integers(1, 4)
                vessels[r : r + w, :] = 255
            else:
                c, w = rng.integers(2, shape[1] - 4), rng.integers(1, 4)
                vessels[:, c : c + w] = 255
        vessels[~fov] = 0
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        image[..., 1][vessels > 0] //= 4
        stem = f"{case}_{split}"
        members[f"{split}/images/{stem}.tif"] = _tif_bytes(image)
        members[f"{split}/1st_manual/{case}_manual1.gif"] = _gif_bytes(vessels)
        members[f"{split}/mask/{stem}_mask.gif"] = _gif_bytes(fov.astype(np.uint8) * 255)
        if split == "test":
            members[f"{split}/2nd_manual/{case}_manual2.gif"] = _gif_bytes(vessels)
    return members


def ctc_members(
    root: str,
    n_frames: int = 6,
    seg_frames: dict[str, list[int]] | None = None,
    shape: tuple[int, int] = (64, 64),
    seed: int = 0,
    published: bool = True,
) -> dict[str, bytes]:
    """A Cell Tracking Challenge 2D training set in the published layout: 16-bit frames, GT/SEG instance
    masks, GT/TRA, and (`published`) the ERR_SEG and ST (silver truth) folders of today's archives."""
    rng = np.random.default_rng(seed)
    seg_frames = seg_frames or {"01": [0, 2, 4], "02": [1, 3]}
    members: dict[str, bytes] = {}
    for seq in ("01", "02"):
        for t in range(n_frames):
            centres = [(16, 16), (16, 30), (44, 40)]  # the first two disks touch
            inst = disk_instances(shape, centres, radius=8)
            frame = (rng.normal(1000, 50, shape) + 2000 * (inst > 0)).clip(0, 65535).astype(np.uint16)
            members[f"{root}/{seq}/t{t:03d}.tif"] = _tif_bytes(frame)
            members[f"{root}/{seq}_GT/TRA/man_track{t:03d}.tif"] = _tif_bytes(inst)
            if t in seg_frames[seq]:
                members[f"{root}/{seq}_GT/SEG/man_seg{t:03d}.tif"] = _tif_bytes(inst)
            if published:  # what the challenge's archives hold today beside GT: not used by segpipe
                members[f"{root}/{seq}_ERR_SEG/mask{t:03d}.tif"] = _tif_bytes((inst > 0).astype(np.uint8))
                members[f"{root}/{seq}_ST/SEG/man_seg{t:03d}.tif"] = _tif_bytes(inst)
        members[f"{root}/{seq}_GT/TRA/man_track.txt"] = b"1 0 5 0\n"
    return members


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(members.items()):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2004, 1, 1, 0, 0, 0)), data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- local mirror -----------------------------------------------------------------------------


@dataclass
class MirrorControl:
    """Knobs the tests turn on the server; `requests` logs (path, Range header) of every GET."""

    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before closing (once)
    fail_500: dict[str, int] = field(default_factory=dict)  # path -> number of 500 answers to give
    no_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(root: Path, control: MirrorControl) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?")[0]
            control.requests.append((path, self.headers.get("Range")))
            if control.fail_500.get(path, 0) > 0:
                control.fail_500[path] -= 1
                self.send_error(500, "flaky")
                return
            file = root / path.lstrip("/")
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and not control.no_range:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = control.cut_after.pop(path, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


class Mirror:
    """A threaded HTTP server on 127.0.0.1 serving `root` (MIRROR/DATASET/ARCHIVE layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.control = MirrorControl()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, self.control))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Mirror":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the offline case)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- a project folder wired to the fixtures ---------------------------------------------------


@dataclass
class FixtureProject:
    """A working folder with configs/ and data_manifests/ describing the fixture datasets."""

    root: Path
    archives: dict[str, list[Path]]  # dataset -> zips as served under mirror/DATASET/

    @property
    def mirror_dir(self) -> Path:
        return self.root / "mirror"

    def data_config(self) -> dict:
        return yaml.safe_load((self.root / "configs" / "data.yaml").read_text())

    def set_data_config(self, cfg: dict) -> None:
        (self.root / "configs" / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def build_fixture_project(root: Path) -> FixtureProject:
    """Zips for drive/hela/u373 in the real layouts, a sources.yaml pointing at them, a DRIVE
    per-file manifest computed here (independently of `segpipe manifest`), and configs/data.yaml."""
    mirror = root / "mirror"
    drive = drive_members()
    train = {k: v for k, v in drive.items() if k.startswith("training/")}
    test = {k: v for k, v in drive.items() if k.startswith("test/")}
    archives = {
        "drive": [write_zip(mirror / "drive" / "training.zip", train), write_zip(mirror / "drive" / "test.zip", test)],
        "hela": [write_zip(mirror / "hela" / "DIC-C2DH-HeLa.zip", ctc_members("DIC-C2DH-HeLa", seed=1))],
        "u373": [write_zip(mirror / "u373" / "PhC-C2DH-U373.zip", ctc_members("PhC-C2DH-U373", seed=2))],
    }
    sources = yaml.safe_load((REPO_ROOT / "data_manifests" / "sources.yaml").read_text())
    for name, zips in archives.items():
        entry = sources["datasets"][name]
        entry["archives"] = [
            {
                "name": z.name,
                "url": f"http://unreachable.invalid/{z.name}",
                "sha256": sha256(z),
                "size": z.stat().st_size,
            }
            for z in zips
        ]
        layout = entry["layout"]
        if name == "drive":
            layout["counts"] = {
                "training/image": 5,
                "training/label": 5,
                "training/fov": 5,
                "test/image": 3,
                "test/label": 3,
                "test/label2": 3,
                "test/fov": 3,
            }
            layout["expect"] = {"image": {"shape": [48, 40, 3], "dtype": ["uint8"]}}
        else:
            layout["counts"] = {"01/image": 6, "02/image": 6}
            layout["expect"] = {r: {"shape": [64, 64], "dtype": ["uint16"]} for r in ("image", "instances")}
    manifests = root / "data_manifests"
    manifests.mkdir(parents=True)
    (manifests / "sources.yaml").write_text(yaml.safe_dump(sources, sort_keys=False))
    rows = []
    for path, data in sorted(drive.items()):
        split, folder, fname = path.split("/")
        role = {"images": "image", "1st_manual": "label", "2nd_manual": "label2", "mask": "fov"}[folder]
        array = tifffile.imread(io.BytesIO(data)) if fname.endswith(".tif") else iio.imread(data, index=0)
        rows.append(
            {
                "path": path,
                "dataset": "drive",
                "split": split,
                "role": role,
                "case": fname[:2],
                "sha256": hashlib.sha256(data).hexdigest(),
                "shape": "x".join(map(str, array.shape)),
                "dtype": str(array.dtype),
            }
        )
    pd.DataFrame(rows).to_csv(manifests / "drive_files.csv", index=False)
    configs = root / "configs"
    shutil.copytree(REPO_ROOT / "configs", configs)
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "data.yaml").read_text())
    cfg["download"].update(retries=3, backoff_seconds=0.01, timeout_seconds=5)
    (configs / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return FixtureProject(root, archives)


def prepare_fixture_datasets(project: FixtureProject, datasets: tuple[str, ...] = ("drive",)) -> None:
    """Import the project's archives (`--from`) and prepare them, in the project's working dir."""
    from pipeline.stages.download import download
    from pipeline.stages.prepare import prepare

    for dataset in datasets:
        download(dataset, from_paths=[str(p) for p in project.archives[dataset]])
        prepare(dataset)


class FlipAveraged(torch.nn.Module):
    """A contract network averaging its logits over flipped inputs (window-level flip TTA)."""

    def __init__(self, net: torch.nn.Module, flips: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.net, self.flips = net, flips
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        for dims in self.flips:
            out = out + self.net(x.flip(dims)).flip(dims)
        return out / (1 + len(self.flips))


class Exploding(nn.Module):
    """Wraps a network; raises on the n-th forward call (an interrupted run)."""

    def __init__(self, net: nn.Module, after: int) -> None:
        super().__init__()
        self.net, self.after, self.calls = net, after, 0
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("simulated interruption")
        return self.net(x)
