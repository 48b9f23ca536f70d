"""`segpipe infer` under torchrun: every process takes a share of the input files.

`torchrun --nproc_per_node N -m pipeline infer ...` (or several nodes through torchrun's
rendezvous) starts N copies of `segpipe infer`. Each expands the inputs, sorts them, checks the
output names of ALL of them for clashes, reads every image's size from its header and runs the same
deterministic greedy assignment (`assign_shards`: largest image first to the least-loaded rank), so
all ranks agree on the shares without talking; then it runs `infer_files` on its own share.

The ranks meet twice on torchrun's TCP store (no process group, no gloo): after listing the inputs,
to refuse the job when they do not all see the same files and sizes (every node needs the same
inputs, e.g. on a shared filesystem), and at the end, because torchrun stops every process as soon
as one exits non-zero: a rank whose files failed waits for the others, then exits with the list.
Rank 0 then prints the job's summary. Every line of a rank starts with `[rank r/N]`; progress bars
are drawn by the first process of each node only (processes sharing a terminal would overwrite each
other's bar line); the others print their summary lines. Torch threads default to the node's cores
divided by its processes (`threads` in `configs/inference.yaml` overrides).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from pipeline.errors import SegpipeError
from pipeline.files import NIFTI_SUFFIXES, has_suffix
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike
from pipeline.inference.readers.images import open_image
from pipeline.inference.run.inputs import check_output_clashes, expand_inputs
from pipeline.inference.run.predict import infer_files
from pipeline.inference.run.report import InferenceReport
from pipeline.inference.settings import InferenceSettings
from pipeline.torchrun import RankEnv

STORE_TIMEOUT = timedelta(minutes=10)
"""How long a rank waits to reach torchrun's store when the job starts."""
_POLL_SECONDS = 0.2


def image_pixels(path: str | os.PathLike[str]) -> int:
    """H x W of the image at `path` from its header (pixels are not read; a .nii.gz is not
    decompressed); 0 if it cannot be read: the rank that gets it reports the error."""
    try:
        if has_suffix(path, NIFTI_SUFFIXES):
            import nibabel as nib

            shape = nib.load(str(path)).shape
            return int(shape[-2]) * int(shape[-1]) if len(shape) >= 2 else 0
        with open_image(path) as reader:
            return reader.shape[1] * reader.shape[2]
    except Exception:
        return 0


def assign_shards(weights: Sequence[int], world: int) -> list[list[int]]:
    """Indices of `weights` for each of `world` ranks, balanced by weight (pixels).

    Greedy: the largest item first (ties: the earlier index) goes to the least-loaded rank (ties:
    fewer items, then the lower rank). Deterministic, so every rank computes the same shares. Each
    share keeps the input order; with more ranks than items the last ranks get none.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    shares: list[list[int]] = [[] for _ in range(world)]
    loads = [0] * world
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(i)
        loads[rank] += weights[i]
    return [sorted(share) for share in shares]


def available_cores() -> int:
    """Cores this process may run on: the CPUs of its affinity mask, at most the physical cores."""
    import psutil

    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return max(1, min(logical, physical))


def threads_per_process(local_world: int) -> int:
    """Default torch threads of each of `local_world` processes on one node: its share of the cores."""
    return max(1, available_cores() // max(1, local_world))


class PrefixedStream:
    """A text stream writing `prefix` before every line (also after a carriage return, so a
    progress bar redrawn in place keeps it); everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream, self._prefix, self._start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in re.split(r"([\r\n])", text):
            if piece in ("\r", "\n"):
                self._start = True
            elif piece and self._start:
                out.append(self._prefix)
                self._start = False
            out.append(piece)
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def prefixed_output(label: str) -> Iterator[None]:
    """stdout and stderr with every line starting with `label` (and a space) inside the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrefixedStream(saved[0], label + " "), PrefixedStream(saved[1], label + " ")
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = saved


class JobStore:
    """The ranks' meeting points on torchrun's TCP store (hosted by torchrun's agent, or by rank 0
    when the job was started without one), under keys of this run and restart."""

    def __init__(self, env: RankEnv, timeout: timedelta = STORE_TIMEOUT) -> None:
        from torch.distributed import PrefixStore
        from torch.distributed.rendezvous import rendezvous

        self.env = env
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            store, _, _ = next(rendezvous("env://", env.rank, env.world, timeout=timeout))
        except Exception as exc:
            raise SegpipeError(
                f"cannot reach torchrun's store at {address} (MASTER_ADDR:MASTER_PORT): {type(exc).__name__}: {exc}"
            ) from exc
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = PrefixStore(f"segpipe-infer/{run}/{attempt}", store)

    def _wait_until(self, counter: str, count: int) -> None:
        while self.store.add(counter, 0) < count:
            time.sleep(_POLL_SECONDS)

    def gather(self, name: str, value: str) -> list[str]:
        """Every rank's `value` (each rank calls this once per `name`), after all have given theirs."""
        self.store.set(f"{name}/{self.env.rank}", value)
        self.store.add(f"{name}/count", 1)
        self._wait_until(f"{name}/count", self.env.world)
        return [self.store.get(f"{name}/{rank}").decode() for rank in range(self.env.world)]

    def leave(self) -> None:
        """Rank 0 (which may host the store) returns once every rank is done with the store."""
        self.store.add("left", 1)
        if self.env.main:
            self._wait_until("left", self.env.world)


def _listing_digest(paths: Sequence[Path], pixels: Sequence[int]) -> str:
    text = "\n".join(f"{p}\t{n}" for p, n in zip(paths, pixels))
    return f"{len(paths)}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def run_shard(
    model: ModelLike | InferenceNetwork,
    inputs: Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    settings: InferenceSettings,
    env: RankEnv,
    show_progress: bool = True,
    **infer_kwargs: Any,
) -> list[InferenceReport]:
    """This rank's share of `inputs` through `infer_files` (see the module's docstring); the reports
    of its images. SegpipeError `[rank r/N] ...` after all ranks finished if any of its inputs
    failed; `infer_kwargs` go to `infer_files` (save_probabilities, nonfinite, class_names)."""
    with prefixed_output(env.label):
        job = JobStore(env)
        start = time.perf_counter()
        error: Exception | None = None
        reports: list[InferenceReport] = []
        paths: list[Path] = []
        pixels: list[int] = []
        try:
            paths = sorted(expand_inputs(inputs), key=str)
            check_output_clashes(paths, output_dir, settings.output_format)
            pixels = [image_pixels(p) for p in paths]
        except Exception as exc:  # raised on every rank alike: after the meeting, so none waits alone
            error = exc
        listings = job.gather("inputs", "" if error else _listing_digest(paths, pixels))
        if error is None and len(set(listings)) > 1:
            differ = [str(r) for r, d in enumerate(listings) if d != listings[0]]
            error = SegpipeError(
                f"the ranks do not see the same inputs (rank(s) {', '.join(differ)} differ from rank 0 in the "
                "files or their sizes): every node needs the same input files, e.g. on a shared filesystem"
            )
        share: list[int] = []
        if error is None:
            share = assign_shards(pixels, env.world)[env.rank]
            try:
                reports = _infer_share(
                    model,
                    [paths[i] for i in share],
                    [pixels[i] for i in share],
                    sum(pixels),
                    output_dir,
                    settings=settings,
                    env=env,
                    show_progress=show_progress and env.local_rank == 0,
                    **infer_kwargs,
                )
            except Exception as exc:
                error = exc
        seconds = time.perf_counter() - start
        results = job.gather(
            "result",
            json.dumps({"inputs": len(share), "seconds": seconds, "error": None if error is None else str(error)}),
        )
        if env.main:
            print(_job_summary([json.loads(r) for r in results], len(paths)), flush=True)
        job.leave()
    if isinstance(error, SegpipeError):
        raise SegpipeError(f"{env.label} {error}") from error
    if error is not None:
        raise error
    return reports


def _infer_share(
    model: ModelLike | InferenceNetwork,
    share: list[Path],
    share_pixels: list[int],
    total_pixels: int,
    output_dir: str | os.PathLike[str],
    *,
    settings: InferenceSettings,
    env: RankEnv,
    show_progress: bool,
    **infer_kwargs: Any,
) -> list[InferenceReport]:
    """Print this rank's share and threads, then run `infer_files` on the share (none: nothing)."""
    if settings.threads is not None:
        threads, why = settings.threads, "the threads setting"
    else:
        threads = threads_per_process(env.local_world)
        why = f"{available_cores()} cores / {env.local_world} processes on this node; set `threads` to change"
    print(
        f"{len(share)} input(s), {sum(share_pixels) / 1e6:.3g} of {total_pixels / 1e6:.3g} Mpx; "
        f"{threads} torch thread(s) ({why})",
        flush=True,
    )
    if not share:
        return []
    return infer_files(
        model,
        [str(p) for p in share],
        output_dir,
        settings=replace(settings, threads=threads),
        show_progress=show_progress,
        **infer_kwargs,
    )


def _job_summary(results: list[dict[str, Any]], n_inputs: int) -> str:
    """Rank 0's closing lines: inputs, each rank's wall time, each failed rank's error."""
    times = ", ".join(f"{r['seconds']:.1f}" for r in results)
    failed = [f"\n  rank {rank}: {r['error']}" for rank, r in enumerate(results) if r["error"]]
    status = "all succeeded" if not failed else f"{len(failed)} rank(s) failed:{''.join(failed)}"
    return f"job: {n_inputs} input(s) over {len(results)} processes, wall s per rank {times}; {status}"


__all__ = [
    "JobStore",
    "PrefixedStream",
    "assign_shards",
    "available_cores",
    "image_pixels",
    "prefixed_output",
    "run_shard",
    "threads_per_process",
]
