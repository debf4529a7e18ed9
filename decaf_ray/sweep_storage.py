"""Where a sweep's results live: a local or shared folder, or a pyarrow filesystem URI (``s3://``,
``gs://``, ``file://``, as Ray Tune's ``storage_path``), and how a trial's run directory gets there.

Ray Tune persists only checkpoints and its own result files to the run's storage; a file a trial
writes lives on whichever node ran it. So a trial writes its run directory (config.json,
metrics.csv, summary.json, adapters.safetensors) to a folder local to its node and ``TrialUpload``
copies it to ``<storage>/<sweep name>/<trial dir name>/`` through Tune's storage filesystem, as
the run goes and when it ends (failed or not). ``analysis.load`` then reads the sweep from storage
whichever nodes ran it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from decaf_ray.config import ConfigError


def location(storage: str | os.PathLike) -> str:
    """``storage`` as Tune's ``storage_path``: a URI as given (no trailing slash), a local path
    made absolute (a relative path would mean a different folder on every node)."""
    text = str(storage)
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def sweep_location(storage: str | os.PathLike, name: str) -> str:
    """Where sweep ``name`` goes: ``<storage>/<name>``, a URI or an absolute path."""
    return f"{location(storage)}/{name}"


def filesystem(uri: str):
    """(pyarrow filesystem, path on it) of a ``location``; a bad URI is a ConfigError."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, missing credentials, bad bucket name, ...
        raise ConfigError("--storage", f"{uri}: not a usable storage path or URI ("
                          f"{_one_line(e)}); give a folder, file://, s3:// or gs://") from None


def holds_anything(uri: str) -> bool:
    """Whether ``uri`` exists and is a file or a non-empty folder."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        return False
    if info.type != pyarrow.fs.FileType.Directory:
        return True
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False)))


def write_text(uri: str, text: str) -> None:
    """Write a small text file at ``uri`` (a path or a URI), creating its folder."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str | None:
    """The text of the file at ``uri``, or None when there is none."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


class TrialUpload:
    """Copies a trial's local run directory to its folder in the sweep's storage.

    ``local``: the folder the trial writes (on its own node); ``fs``, ``fs_path``: Tune's storage
    filesystem and the trial's folder on it (``StorageContext.trial_fs_path``). Only files changed
    since the last upload are copied; on a local filesystem through a temporary name and a rename,
    so a reader never sees half a file (object stores write whole objects anyway).
    """

    def __init__(self, local: str | Path, fs, fs_path: str):
        self.local, self.fs, self.fs_path = Path(local), fs, fs_path
        self._sent: dict[str, tuple[int, int]] = {}
        self.last = 0.0

    @classmethod
    def for_current_trial(cls) -> "TrialUpload":
        """The upload of the Tune trial this process runs: a fresh local folder in the trial's
        working directory (on this node), to ``<storage>/<experiment>/<trial dir>``."""
        from ray.train._internal.session import get_storage  # Ray 2.x's storage context

        storage = get_storage()
        local = Path(storage.trial_working_directory) / "decaf-run"
        shutil.rmtree(local, ignore_errors=True)  # an earlier attempt's files are not this one's
        return cls(local, storage.storage_filesystem, storage.trial_fs_path)

    def remove(self, name: str) -> None:
        """Delete ``name`` from the trial's storage folder if it is there (a stale summary of
        an earlier attempt, when a trial resumes)."""
        import pyarrow.fs

        path = f"{self.fs_path}/{name}"
        if self.fs.get_file_info(path).type == pyarrow.fs.FileType.File:
            self.fs.delete_file(path)

    def sync(self, every_s: float = 0.0) -> None:
        """Copy new or changed files up, unless the last upload is under ``every_s`` old."""
        now = time.monotonic()
        if every_s and now - self.last < every_s:
            return
        self.last = now
        if not self.local.is_dir():
            return
        self.fs.create_dir(self.fs_path, recursive=True)
        local_fs = self.fs.type_name == "local"
        for f in sorted(self.local.iterdir()):
            if not f.is_file():
                continue
            st = f.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if self._sent.get(f.name) == stamp:
                continue
            dest = f"{self.fs_path}/{f.name}"
            target = f"{dest}.part" if local_fs else dest
            with open(f, "rb") as src, self.fs.open_output_stream(target) as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            if local_fs:
                self.fs.move(target, dest)
            self._sent[f.name] = stamp


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
