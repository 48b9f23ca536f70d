"""`segpipe download DATASET`: fetch or import a dataset's archives into `data/raw/DATASET/`.

HTTP(S) with resume (Range), retries with exponential backoff and a progress bar. The sha256 is
verified before an archive gets its final name; a partial download lives under `NAME.part` only.
A resumed download with the wrong sha256 (a corrupt or stale `.part`) is discarded and fetched once
more from zero; only a download from zero with the wrong sha256 is reported as a re-packed archive.
An archive already present and verified is not fetched again. The result is recorded in
`data/raw/DATASET/download.json`, which `segpipe prepare` reads. A dataset whose card names folders,
an nnU-Net raw folder or a MONAI datalist has nothing to fetch: its record lists every file with its
sha256, for DVC to see.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import requests
import urllib3
from tqdm import tqdm

from pipeline.data import folders, importers
from pipeline.data.cards import DatasetCard
from pipeline.data.io import sha256_file, write_text
from pipeline.data.settings import DataConfig, DownloadConfig
from pipeline.data.sources import Archive, DatasetSource, get_source
from pipeline.errors import SegpipeError
from pipeline.files import atomic_path

log = logging.getLogger(__name__)

MIRROR_ENV = "SEGPIPE_MIRROR"
RECORD_NAME = "download.json"


@dataclass(frozen=True)
class DownloadSettings:
    """The `download` section of configs/data.yaml."""

    retries: int = 5
    backoff_seconds: float = 2.0
    timeout_seconds: float = 60.0
    chunk_bytes: int = 1 << 20

    @classmethod
    def from_config(cls, cfg: DownloadConfig) -> "DownloadSettings":
        """From the checked `download` section (`pipeline.data.settings.check_data_config`)."""
        return cls(cfg.retries, cfg.backoff_seconds, cfg.timeout_seconds, cfg.chunk_bytes)


class _Retryable(Exception):
    """A transfer error worth another attempt (connection cut, timeout, 5xx)."""


def archive_url(archive: Archive, dataset: str, mirror: str | None) -> str:
    """The archive's URL, or `MIRROR/DATASET/NAME` when a mirror is set."""
    return f"{mirror.rstrip('/')}/{dataset}/{archive.name}" if mirror else archive.url


def _override_hint(dataset: str) -> str:
    return (
        f"use a mirror (--mirror URL, ${MIRROR_ENV}, or download.mirror in configs/data.yaml; files are "
        f"fetched from MIRROR/{dataset}/ARCHIVE) or import archives already on disk "
        f"(segpipe download {dataset} --from PATH)"
    )


def _fetch_once(url: str, part: Path, settings: DownloadSettings, expected_size: int | None) -> None:
    """One attempt: continue `part` from its current size with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    # identity encoding: byte ranges and the sha256 then refer to the archive's own bytes
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=settings.timeout_seconds) as resp:
            if resp.status_code == 416 and have:
                return  # nothing after `have`: complete, or longer than the archive (the sha256 decides)
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Retryable(f"HTTP {resp.status_code}")
            if resp.status_code not in (200, 206):
                raise SegpipeError(f"{url}: HTTP {resp.status_code} {resp.reason}; expected the archive")
            mode = "ab" if resp.status_code == 206 else "wb"
            if mode == "wb":
                have = 0  # the server ignored Range: start over
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else expected_size
            with (
                open(part, mode) as fh,
                tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    leave=False,
                ) as bar,
            ):
                # read1 hands over whatever has arrived, so a cut connection loses no received bytes
                while chunk := resp.raw.read1(settings.chunk_bytes):
                    fh.write(chunk)
                    bar.update(len(chunk))
            if length is not None and part.stat().st_size != have + int(length):
                raise _Retryable(f"connection closed after {part.stat().st_size} of {total} bytes")
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
    ) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc


def fetch_archive(
    url: str, dest: Path, archive: Archive, accepted: set[str], settings: DownloadSettings, dataset: str
) -> str:
    """Download `url` to `dest` (resuming `dest.part`), verify its sha256, rename. Returns the hash.

    A download resumed from an existing `dest.part` that ends with the wrong sha256 is discarded and
    fetched once more from zero; a download from zero with the wrong sha256 is an error naming both
    hashes and the override (the host re-packed the archive)."""
    part = dest.with_name(dest.name + ".part")
    wanted = accepted | {archive.sha256}
    resumed = part.is_file() and part.stat().st_size > 0
    _download(url, part, settings, archive.size, dataset)
    digest = sha256_file(part)
    if resumed and digest not in wanted:
        part.unlink()
        log.warning(
            "%s: the download resumed from an existing %s has sha256 %s, expected %s: that partial file was "
            "corrupt or from another version of the archive. Discarded it; downloading again from zero.",
            url,
            part.name,
            digest,
            archive.sha256,
        )
        _download(url, part, settings, archive.size, dataset)
        digest = sha256_file(part)
    if digest not in wanted:
        part.unlink()
        raise SegpipeError(_mismatch_message(url, archive, digest, dataset))
    os.replace(part, dest)
    return digest


def _download(url: str, part: Path, settings: DownloadSettings, expected_size: int | None, dataset: str) -> None:
    """Fetch `url` into `part` (continuing it), retrying transfer errors with exponential backoff."""
    for attempt in range(1, settings.retries + 1):
        try:
            _fetch_once(url, part, settings, expected_size)
            return
        except _Retryable as exc:
            if attempt == settings.retries:
                raise SegpipeError(
                    f"could not download {url} after {settings.retries} attempts (last error: {exc}); "
                    f"the partial file {part} is kept and resumed next time. Offline? {_override_hint(dataset)}"
                ) from exc
            wait = settings.backoff_seconds * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", url, attempt, settings.retries, exc, wait)
            time.sleep(wait)


def _mismatch_message(origin: str, archive: Archive, digest: str, dataset: str) -> str:
    return (
        f"{origin}: sha256 mismatch for {archive.name}: expected {archive.sha256} (data_manifests/sources.yaml), "
        f"got {digest} from a download from zero. Nothing was kept under {archive.name}. The host probably "
        f"re-packed the archive; if you trust it, accept this hash explicitly: segpipe download {dataset} "
        f"--accept-sha256 {digest} (or add it to download.accept_sha256 in configs/data.yaml); prepare still "
        f"checks every file."
    )


def import_archive(path: Path, raw_dir: Path, source: DatasetSource, accepted: set[str]) -> dict[str, Any]:
    """Copy an archive from disk into `raw_dir`, verified: known hash -> its name; accepted -> own name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegpipeError(f"{path}: --from archive not found (expected a .zip of the {source.name} dataset)")
    digest = sha256_file(path)
    known = {a.sha256: a for a in source.archives}
    if digest in known:
        name = known[digest].name
    elif digest in accepted:
        name = path.name
    else:
        expected = ", ".join(f"{a.name}={a.sha256}" for a in source.archives)
        raise SegpipeError(
            f"{path}: sha256 {digest} matches no known {source.name} archive ({expected}). If this is an "
            f"official archive (e.g. DRIVE.zip) or a trusted re-pack, accept it explicitly: "
            f"segpipe download {source.name} --from {path} --accept-sha256 {digest}; prepare then checks every file."
        )
    dest = raw_dir / name
    if not (dest.is_file() and sha256_file(dest) == digest):
        with atomic_path(dest) as tmp:
            shutil.copyfile(path, tmp)
    log.info("imported %s as %s (sha256 %s)", path, dest, digest)
    return {"name": name, "sha256": digest, "source": str(path), "accepted_override": digest not in known}


def download_dataset(
    card: DatasetCard,
    cfg: DataConfig,
    *,
    from_paths: Sequence[str] | None = None,
    accept_sha256: Sequence[str] | None = None,
    mirror: str | None = None,
) -> Path:
    """Fetch or import every archive of the dataset of `card` (a folder dataset: record its files) as
    configs/data.yaml (`cfg`, checked) says; returns the raw folder. Arguments win over `cfg`."""
    dataset, dl_cfg = card.name, cfg.download
    raw_dir = Path(cfg.raw_dir) / dataset
    raw_dir.mkdir(parents=True, exist_ok=True)
    if card.archives is None:
        if from_paths or accept_sha256 or mirror:
            raise SegpipeError(
                f"{card.path}: {dataset} is read from files on disk; --from, --accept-sha256 and "
                "--mirror are for archive sources"
            )
        return record_files(card, raw_dir, dataset)
    source = get_source(Path(cfg.manifests_dir), card.archives or dataset)
    accepted = {h.lower() for h in (accept_sha256 or []) + list(dl_cfg.accept_sha256)}
    imports = list(from_paths or dl_cfg.imports.get(dataset) or [])
    mirror = mirror or os.environ.get(MIRROR_ENV) or dl_cfg.mirror
    settings = DownloadSettings.from_config(dl_cfg)

    records: list[dict[str, Any]] = []
    if imports:
        records = [import_archive(Path(p), raw_dir, source, accepted) for p in imports]
    elif (kept := earlier_imports(raw_dir)) is not None:
        records = kept
        log.info(
            "%s: kept the archive(s) imported earlier with --from (sha256 verified): %s",
            raw_dir,
            ", ".join(r["name"] for r in kept),
        )
    else:
        for archive in source.archives:
            dest = raw_dir / archive.name
            url = archive_url(archive, dataset, mirror)
            if dest.is_file() and (digest := sha256_file(dest)) in accepted | {archive.sha256}:
                log.info("%s: already downloaded and verified", dest)
            else:
                log.info("downloading %s -> %s", url, dest)
                digest = fetch_archive(url, dest, archive, accepted, settings, dataset)
            records.append(
                {"name": archive.name, "sha256": digest, "source": url, "accepted_override": digest != archive.sha256}
            )
    keep = {r["name"] for r in records} | {RECORD_NAME}
    for stale in raw_dir.iterdir():
        if stale.is_file() and stale.name not in keep and not stale.name.endswith(".part"):
            log.info("removing %s: not part of this download", stale)
            stale.unlink()
    write_text(raw_dir / RECORD_NAME, json.dumps({"dataset": dataset, "archives": records}, indent=2) + "\n")
    print(f"{dataset}: {len(records)} archive(s) verified in {raw_dir}")
    return raw_dir


def record_files(card: DatasetCard, raw_dir: Path, dataset: str) -> Path:
    """The download of a dataset read in place (folders, nnU-Net folder, datalist): nothing to fetch;
    every file of its source with its sha256 goes into `raw_dir/download.json`, the file DVC sees
    change when an image or label changes."""
    if card.folders is not None:
        files, entries = folders.fingerprint(card.folders), card.folders.entries()
        record = {"dataset": dataset, "folders": {k: str(v) for k, v in entries.items()}, "files": files}
    else:
        assert card.imported is not None  # a card without archives has folders or an imported source
        files, entries = importers.fingerprint(card.imported), card.imported.entries()
        record = {"dataset": dataset, "source": {k: str(v) for k, v in entries.items()}, "files": files}
    write_text(raw_dir / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    print(f"{dataset}: recorded the sha256 of {len(files)} file(s) of its source in {raw_dir / RECORD_NAME}")
    return raw_dir


def earlier_imports(raw_dir: Path) -> list[dict[str, Any]] | None:
    """The records of archives an earlier `segpipe download --from` imported into `raw_dir` (its
    download.json), when every one of them is still there with its recorded sha256: `dvc repro` after
    `segpipe download DATASET --from X [--accept-sha256 H]` keeps them instead of fetching. None when
    there is no such record, or one came from a URL, is missing or changed."""
    try:
        records = read_record(raw_dir)
    except SegpipeError:
        return None
    for record in records:
        fields = ("name", "sha256", "source")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
            return None
        path = raw_dir / Path(record["name"]).name
        remote = record["source"].startswith(("http://", "https://"))
        if remote or not path.is_file() or sha256_file(path) != record["sha256"]:
            return None
    return records or None


def read_record(raw_dir: Path) -> list[dict[str, Any]]:
    """The archives a previous `segpipe download` verified into `raw_dir`."""
    path = Path(raw_dir) / RECORD_NAME
    if not path.is_file():
        raise SegpipeError(f"{path}: not found; run `segpipe download {Path(raw_dir).name}` first")
    try:
        return list(json.loads(path.read_text())["archives"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SegpipeError(f"{path}: expected the JSON record written by segpipe download ({exc})") from exc
