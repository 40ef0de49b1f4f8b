"""Artifact storage roots: a local path, or a pyarrow filesystem URI shared by several nodes.

A *storage root* holds ``jobs/<job_id>/`` per job (checkpoints, final adapter, metrics log).
A local path (or an NFS mount, which is a local path on every node) is used directly: the
worker trains in place and checkpoints are atomic renames (``actors.checkpoint``). A URI
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file:///abs/path``) is opened with
``pyarrow.fs.FileSystem.from_uri``: the worker trains in a local staging directory,
downloads the job's files before it joins (:func:`sync_down`), and uploads them after each
checkpoint and at the end (:func:`sync_up`).

Upload order keeps a remote copy usable at every moment: a checkpoint directory is uploaded
under a temporary name and then moved to ``checkpoints/step-N`` (a rename on local/NFS/HDFS
filesystems; on object stores a copy, after which the directory is complete), and the final
adapter files are uploaded only after every checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def sync_up(local: str | os.PathLike, uri: str) -> None:
    """Upload the job directory ``local`` to ``uri``: new checkpoints first, then the other files.

    Raises ``OSError`` when the destination cannot be written.
    """
    from pyarrow import fs as pafs

    filesystem, root = _fs(uri)
    local = Path(local)
    lfs = pafs.LocalFileSystem()
    try:
        filesystem.create_dir(root, recursive=True)
        ckpts = local / "checkpoints"
        if ckpts.is_dir():
            filesystem.create_dir(f"{root}/checkpoints", recursive=True)
            for entry in sorted(ckpts.iterdir()):
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                final = f"{root}/checkpoints/{entry.name}"
                if filesystem.get_file_info(final).type != pafs.FileType.NotFound:
                    continue  # checkpoints never change once written
                tmp = f"{root}/checkpoints/.tmp-{entry.name}"
                filesystem.create_dir(tmp, recursive=True)
                pafs.copy_files(
                    str(entry.resolve()), tmp, source_filesystem=lfs, destination_filesystem=filesystem
                )
                filesystem.move(tmp, final)
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
