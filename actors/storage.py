"""Artifact storage roots: a local path, or a pyarrow filesystem URI shared by several nodes.

A *storage root* holds ``jobs/<job_id>/`` per job (checkpoints, final adapter, metrics log).
A local path (or an NFS mount, which is a local path on every node) is used directly: the
worker trains in place and checkpoints are atomic renames (``actors.checkpoint``). A URI
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file:///abs/path``) is opened with
``pyarrow.fs.FileSystem.from_uri``: the worker trains in a local staging directory,
downloads the job's files before it joins (:func:`sync_down`), and uploads them after each
checkpoint and at the end (:func:`sync_up`). Single files (a laptop's uploaded data, a job's
URI inputs) move with :func:`upload_file` and :func:`download_file`.

Upload order keeps a remote copy usable at every moment: on filesystems that rename directories
(local, NFS, HDFS) a checkpoint directory is uploaded under a temporary name and then moved to
``checkpoints/step-N``; object stores (S3, GCS) cannot rename a directory, so its files are
written in place with ``trainer_state.json`` last (each object appears whole; a checkpoint without
that file is incomplete, and resuming skips it for an older one). The final adapter files are
uploaded only after every checkpoint. ``tests/actors/test_storage_s3.py`` runs all of this against
an S3 server on loopback (moto).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_CHUNK = 1 << 20


def is_uri(root: str) -> bool:
    """True for ``scheme://...`` storage roots (pyarrow filesystems), False for local paths."""
    return "://" in root


def job_output(root: str, job_id: str) -> str:
    """``<root>/jobs/<job_id>`` for a local path or a URI."""
    return (
        f"{root.rstrip('/')}/jobs/{job_id}"
        if is_uri(root)
        else str(Path(root).expanduser() / "jobs" / job_id)
    )


def _fs(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def delete_tree(target: str) -> bool:
    """Delete the directory ``target`` (a local path or a storage URI) and everything under it; False
    when it did not exist. Raises ``OSError`` when it exists and cannot be deleted."""
    if not is_uri(target):
        path = Path(target)
        if not path.is_dir():
            return False
        shutil.rmtree(path)
        return True
    from pyarrow import fs as pafs

    filesystem, path = _fs(target)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return False
    try:
        filesystem.delete_dir(path)
    except Exception as exc:  # pyarrow raises ArrowException subclasses not all derived from OSError
        raise OSError(f"cannot delete {target}: {exc}") from exc
    return True


def upload_file(local: str | os.PathLike, uri: str) -> None:
    """Upload ONE local file to the object/file ``uri`` (its parent directory is created).

    The bytes go to a temporary name next to ``uri`` first and are then moved there, so a reader
    never sees half a file on filesystems with a rename (local, HDFS); an object store writes the
    object at once. Raises ``OSError`` when ``local`` is not a file or ``uri`` cannot be written.
    """
    from pyarrow import fs as pafs

    local = Path(local)
    if not local.is_file():
        raise FileNotFoundError(f"{local}: not a file, nothing to upload to {uri}")
    filesystem, path = _fs(uri)
    parent, _, name = path.rstrip("/").rpartition("/")
    try:
        if parent:
            filesystem.create_dir(parent, recursive=True)
        if isinstance(filesystem, pafs.LocalFileSystem):
            tmp = f"{parent}/.tmp-{name}-{os.getpid()}"
            _copy_stream(local, filesystem, tmp)
            filesystem.move(tmp, path)
        else:
            _copy_stream(local, filesystem, path)
    except OSError:
        raise
    except Exception as exc:  # pyarrow raises ArrowException subclasses not all derived from OSError
        raise OSError(f"upload of {local} to {uri} failed: {exc}") from exc


def _copy_stream(local: Path, filesystem, path: str) -> None:
    with local.open("rb") as src, filesystem.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def download_file(uri: str, local: str | os.PathLike) -> Path:
    """Download the ONE file at ``uri`` to the local path ``local`` (parent created); returns it.

    Raises ``FileNotFoundError`` when ``uri`` is not a file (missing, or a directory), ``OSError``
    when it cannot be read.
    """
    from pyarrow import fs as pafs

    filesystem, path = _fs(uri)
    local = Path(local)
    try:
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            kind = "a directory" if info.type == pafs.FileType.Directory else "no such file"
            raise FileNotFoundError(f"{uri}: {kind}")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".tmp-{local.name}-{os.getpid()}")
        with filesystem.open_input_stream(path) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, local)
    except OSError:
        raise
    except Exception as exc:
        raise OSError(f"download of {uri} failed: {exc}") from exc
    return local


def read_tail(uri: str, limit: int) -> tuple[bytes, int]:
    """The last ``limit`` bytes (at most) of the ONE file at ``uri``, and the offset they start at (0: the
    whole file). Object stores read only that range.

    Raises ``FileNotFoundError`` when ``uri`` is not a file, ``OSError`` when it cannot be read (no
    access, an unparseable URI).
    """
    from pyarrow import fs as pafs

    try:
        filesystem, path = _fs(uri)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            kind = "a directory" if info.type == pafs.FileType.Directory else "no such file"
            raise FileNotFoundError(f"{uri}: {kind}")
        start = max(0, (info.size or 0) - max(0, limit))
        with filesystem.open_input_file(path) as src:
            src.seek(start)
            return src.read(max(0, limit)), start
    except OSError:
        raise
    except Exception as exc:  # pyarrow raises ArrowException subclasses not all derived from OSError
        raise OSError(f"read of {uri} failed: {exc}") from exc


def sync_down(uri: str, local: str | os.PathLike) -> bool:
    """Download everything under ``uri`` into ``local`` (created). False if ``uri`` does not exist."""
    from pyarrow import fs as pafs

    filesystem, path = _fs(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local).resolve()), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    return True


#: written last into every checkpoint directory (actors.checkpoint.save_checkpoint): one that lacks it is incomplete
CHECKPOINT_MARKER = "trainer_state.json"


def _renames_directories(filesystem) -> bool:
    """Whether ``filesystem.move`` renames a whole directory (local and HDFS); object stores
    (S3, GCS) move only single objects."""
    from pyarrow import fs as pafs

    return isinstance(filesystem, pafs.LocalFileSystem) or type(filesystem).__name__ == "HadoopFileSystem"


def _complete_checkpoint(filesystem, path: str) -> bool:
    from pyarrow import fs as pafs

    return filesystem.get_file_info(f"{path}/{CHECKPOINT_MARKER}").type == pafs.FileType.File


def sync_up(local: str | os.PathLike, uri: str) -> None:
    """Upload the job directory ``local`` to ``uri``: new checkpoints first, then the other files.

    A single file (not a directory) is uploaded as the file ``uri`` (:func:`upload_file`).
    Raises ``OSError`` when the destination cannot be written.
    """
    from pyarrow import fs as pafs

    local = Path(local)
    if local.is_file():
        upload_file(local, uri)
        return
    filesystem, root = _fs(uri)
    lfs = pafs.LocalFileSystem()
    try:
        filesystem.create_dir(root, recursive=True)
        ckpts = local / "checkpoints"
        if ckpts.is_dir():
            filesystem.create_dir(f"{root}/checkpoints", recursive=True)
            renames = _renames_directories(filesystem)
            for entry in sorted(ckpts.iterdir()):
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                final = f"{root}/checkpoints/{entry.name}"
                if _complete_checkpoint(filesystem, final):
                    continue  # checkpoints never change once written
                if renames:
                    tmp = f"{root}/checkpoints/.tmp-{entry.name}"
                    filesystem.create_dir(tmp, recursive=True)
                    pafs.copy_files(str(entry.resolve()), tmp, source_filesystem=lfs, destination_filesystem=filesystem)
                    if filesystem.get_file_info(final).type != pafs.FileType.NotFound:
                        filesystem.delete_dir(final)  # an earlier, interrupted upload
                    filesystem.move(tmp, final)
                else:
                    # Object stores (S3, GCS) cannot rename a directory, but each object appears whole:
                    # the files go straight to their place, the marker last. A reader that finds a
                    # checkpoint without it skips that checkpoint (actors.engine resumes from an older one).
                    files = sorted(p for p in entry.iterdir() if p.is_file())
                    for file in sorted(files, key=lambda p: p.name == CHECKPOINT_MARKER):
                        _copy_stream(file, filesystem, f"{final}/{file.name}")
            kept = {p.name for p in ckpts.iterdir()}
            for info in filesystem.get_file_info(pafs.FileSelector(f"{root}/checkpoints")):
                if info.base_name not in kept and not info.base_name.startswith("."):
                    filesystem.delete_dir(info.path)  # pruned locally (keep-last-N)
        for entry in sorted(local.iterdir()):
            if entry.is_file():
                with entry.open("rb") as src, filesystem.open_output_stream(f"{root}/{entry.name}") as dst:
                    dst.write(src.read())
    except OSError:
        raise
    except Exception as exc:  # pyarrow raises ArrowException subclasses not all derived from OSError
        raise OSError(f"upload to {uri} failed: {exc}") from exc
