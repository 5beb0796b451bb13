"""The job's output folder (job.dump_folder): checked before anything is built, and kept per run.

A folder that cannot be written used to fail at the first checkpoint save, hundreds of steps in;
`output_folder_error` finds that before the model is built. A new run (from step 0) in a folder
an earlier run used moves the earlier run's metrics aside (`keep_earlier_run`), so the records
of two runs never mix in one metrics.jsonl.
"""

import os
import tempfile
import time


def output_folder_error(folder: str) -> str | None:
    """Why `folder` cannot hold this job's outputs (one line), or None after creating it."""
    if not folder:
        return "job.dump_folder is empty; give the folder for metrics and checkpoints (default ./outputs)"
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"job.dump_folder {folder}: is a file, not a folder; choose another job.dump_folder"
    blocking_file = _file_on_the_way(folder)
    if blocking_file:
        return (
            f"job.dump_folder {folder}: cannot be created because {blocking_file} is a file;"
            " choose another job.dump_folder"
        )
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"job.dump_folder {folder}: not writable ({e.strerror}); choose a folder you can write to"
    return None


def _file_on_the_way(folder: str) -> str | None:
    """The nearest existing parent of `folder` when it is a file, not a folder."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def keep_earlier_run(folder: str, names: list[str]) -> list[str]:
    """Rename the entries `names` of `folder` that exist to `<stem>.<time><ext>` (time of their
    last change); returns the new names ([] when there was nothing to move)."""
    existing = [name for name in names if os.path.exists(os.path.join(folder, name))]
    if not existing:
        return []
    last_change = max(os.path.getmtime(os.path.join(folder, name)) for name in existing)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(last_change))
    suffix, n = stamp, 1
    while any(os.path.exists(os.path.join(folder, _renamed(name, suffix))) for name in existing):
        n += 1
        suffix = f"{stamp}-{n}"
    for name in existing:
        os.rename(os.path.join(folder, name), os.path.join(folder, _renamed(name, suffix)))
    return [_renamed(name, suffix) for name in existing]


def _renamed(name: str, suffix: str) -> str:
    """metrics.jsonl -> metrics.<suffix>.jsonl; tb -> tb.<suffix>."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.{suffix}{ext}"
