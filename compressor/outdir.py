"""The output-folder contract, in one place.

`--out` may be a new path, an empty folder, or a folder this tool wrote before (it holds the
marker `.compressor-output.json`, listing every file written) when `overwrite` is set. Anything
else is refused before any work starts: a file, a folder holding other files, the input model's
folder, a folder inside it or containing it, the current folder or one of its parents.

Outputs are written into a staging folder beside `--out` (`.NAME.tmp-PID-XXXX`, made by mkdir with
a random suffix, holding `.compressor-staging`) and renamed into place only when the run succeeded
and its result was checked (see `OutputClaim.publish`); a result that failed its checks is kept
aside as `NAME.failed/` (or `NAME.failed-XXXX/` when that name holds files the tool did not
write). A lock file (`.NAME.lock`, created with O_EXCL, never through a symlink, flock) makes a
second concurrent run into the same `--out` fail at once. Files and folders get the umask's modes.
Never is a path deleted or written through that the tool did not create in this run and that no
marker of it lists: an old output is replaced file by file from its marker's list, anything else
found in it is carried over, and a killed run's staging folder is salvaged only when it holds the
staging file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ModelError, OutputError

MARKER = ".compressor-output.json"
STAGING_MARKER = ".compressor-staging"  # inside a staging folder while a run writes it
log = logging.getLogger("compressor")


def resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def local_inputs(names: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The inputs (model, resume folder, data file) that are paths on this machine, resolved."""
    paths = []
    for name in names:
        if name in (None, "", "default"):
            continue
        path = Path(str(name)).expanduser()
        if path.exists():
            paths.append(path.resolve())
    return paths


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder this tool wrote, or None."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def foreign_files(folder: Path, marker: dict) -> list[str]:
    """Files (relative names) under `folder` that the marker does not list: not ours to delete."""
    ours = set(marker["files"]) | {MARKER}
    return sorted(rel for rel in _relative_files(folder) if rel not in ours)


def _relative_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def check_output_dir(folder: str | os.PathLike, *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse (OutputError, one line) an `--out` the contract above does not allow; returns it resolved."""
    folder = resolved(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output `{folder}` exists and is a file; choose another --out")
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        raise OutputError(f"output `{folder}` is the current folder or a parent of it; pass a new folder name "
                          "such as --out results/run1")
    for source in local_inputs(inputs):
        if folder == source or folder in source.parents:
            raise OutputError(f"output `{folder}` holds the input `{source}`; writing there would destroy it; "
                              "choose another --out")
        if source in folder.parents:
            raise OutputError(f"output `{folder}` is inside the input `{source}`; the tool never writes into its "
                              "input; choose an --out outside it")
    if folder.is_dir() and any(folder.iterdir()):
        _check_previous_output(folder, overwrite)
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is None or not _can_create_in(parent):
        raise OutputError(f"cannot write output folder `{folder}`: `{parent}` is not writable; choose another --out")
    return folder


def _check_previous_output(folder: Path, overwrite: bool) -> None:
    marker = read_marker(folder)
    if marker is None:
        raise OutputError(f"output folder `{folder}` holds files this tool did not write; choose an empty or "
                          "new --out")
    if not overwrite:
        raise OutputError(f"output folder `{folder}` holds a previous result; pass --overwrite to replace it, or "
                          "choose another --out")
    others = foreign_files(folder, marker)
    if others:
        raise OutputError(f"output folder `{folder}` also holds files this tool did not write (e.g. `{others[0]}`); "
                          "move them away or choose another --out")


def _can_create_in(parent: Path) -> bool:
    """Probe by creating (and removing) a folder: os.access() says yes to root on read-only mounts."""
    try:
        probe = Path(tempfile.mkdtemp(prefix=".compressor-probe-", dir=parent))
    except OSError:
        return False
    probe.rmdir()
    return True


def umask_mode(base: int = 0o777) -> int:
    """`base` with the process umask applied (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def staging_name(folder: Path) -> str:
    return f".{folder.name}.tmp-"


def sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


# ---------------------------------------------------------------------------------------------
# The lock


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[Path]:
    """Hold `.NAME.lock` beside `folder`; a second holder fails at once (OutputError).

    The lock file is created exclusively (O_EXCL) and never through a symlink. A lock file left by
    a killed run (it holds only a pid, and nobody holds its flock) is taken over; any other file of
    that name is the user's: refused, never changed. Only the lock file this run holds is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True, mode=umask_mode())
    path = folder.with_name(f".{folder.name}.lock")
    fd = _open_lock(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)


_LOCK_TEXT = re.compile(rb"^\d+\n$")


def _open_lock(path: Path, folder: Path) -> int:
    """A descriptor of `path`, flock-ed by this process: created new, or a dead run's lock file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, umask_mode(0o666))
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, flags)
        except OSError:  # a symlink (ELOOP), a folder, or unreadable: not ours
            raise _foreign_lock(path) from None
        created = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"another compressor run is writing `{folder}` (lock `{path}`); wait for it to "
                          "finish or choose another --out") from None
    if not created and not (stat.S_ISREG(os.fstat(fd).st_mode) and _LOCK_TEXT.match(os.pread(fd, 64, 0))):
        os.close(fd)
        raise _foreign_lock(path)
    if not _same_file(fd, path):  # a finishing run unlinked it between our open and flock
        os.close(fd)
        return _open_lock(path, folder)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return False


def _foreign_lock(path: Path) -> OutputError:
    return OutputError(f"`{path}` exists and is not a lock this tool wrote; move it away (the tool never "
                       "changes it) or choose another --out")


# ---------------------------------------------------------------------------------------------
# Claim, stage, publish


class OutputClaim:
    """A checked and locked `--out`: `stage()` yields the staging folder, `publish()` moves it in."""

    def __init__(self, folder: Path, overwrite: bool):
        self.folder, self.overwrite = folder, overwrite

    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """A fresh staging folder beside `--out`; removed on any failure (named if it cannot be)."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{staging_name(self.folder)}{os.getpid()}-", dir=self.folder.parent))
        tmp.chmod(umask_mode())  # mkdtemp makes 0700 whatever the umask
        (tmp / STAGING_MARKER).write_text(f"{os.getpid()}\n")  # what a later run may salvage and delete
        try:
            yield tmp
        except BaseException as err:
            remove_staging(tmp, err)
            raise

    def publish(self, tmp: Path, *, command: str = "", problems: Iterable[str] = ()) -> Path:
        """Write the marker into `tmp` and make it `--out`: renamed into place, replacing (only) the
        files a previous output's marker lists; other files found there are carried over.

        With `problems` (why the result is unusable: non-finite weights, loss or metric) the result
        goes to `NAME.failed/` instead and ModelError says why and where."""
        problems = list(problems)
        if problems:
            where = self.set_aside(tmp, "; ".join(problems), command=command)
            more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
            raise ModelError(f"the result is not usable: {'; '.join(problems[:2])}{more}; nothing was written to "
                             f"`{self.folder}` (kept for inspection in `{where}`); lower `lr`, check the data, "
                             "or use a milder setting")
        write_marker(tmp, command)
        folder = self.folder
        with signals_deferred():  # Ctrl-C / SIGTERM wait until both renames are done
            self._swap_in(tmp)
        discard_ours(sibling(folder, ".partial"))  # training progress, superseded by this result
        return folder

    def _swap_in(self, tmp: Path) -> None:
        folder = self.folder
        if folder.is_dir() and any(folder.iterdir()):
            _check_previous_output_again(folder)
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            old.rmdir()
            folder.rename(old)
            tmp.rename(folder)
            _carry_over_and_remove(old, folder)
        else:
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()  # an empty folder
            tmp.rename(folder)

    def set_aside(self, tmp: Path, reason: str, *, command: str = "") -> Path:
        """Keep a result that failed its checks as `NAME.failed/` (never in place of `--out`)."""
        write_marker(tmp, command, failed=reason)
        target = sibling(self.folder, ".failed")
        remove_if_ours(target)  # an earlier failure's result, nothing else in it
        if target.exists() or target.is_symlink():  # someone else's, or ours plus user files: keep it
            target = fresh_sibling(self.folder, ".failed-")
        tmp.rename(target)
        return target


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (delivered on exit) so a publish or an optimizer step is never left
    half done.

    Masking the main thread alone is not enough: the kernel hands a process-wide signal to any
    thread that does not block it (torch's and gloo's workers), and Python then runs the handler
    in the main thread at its next bytecode, inside the block. So the handlers themselves are
    swapped for one that only records the signal, which is re-raised once the block is over."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in held}
    for sig in held:
        if previous[sig] is not None:  # None: a handler set outside Python, which we cannot put back
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)  # and no EINTR in the main thread meanwhile
    try:
        yield
    finally:
        for sig in held:
            if previous[sig] is not None:
                signal.signal(sig, previous[sig])
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that waited on the mask runs here
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # the restored handler (the CLI's raises KeyboardInterrupt)


@contextlib.contextmanager
def claim_output(folder: str | os.PathLike, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[OutputClaim]:
    """Check `--out` against the contract and lock it for the duration (before any model loads)."""
    path = check_output_dir(folder, overwrite=overwrite, inputs=inputs)
    with output_lock(path):
        path = check_output_dir(path, overwrite=overwrite, inputs=inputs)  # the lock may have waited on a writer
        salvage_stale_staging(path)
        yield OutputClaim(path, overwrite)


@contextlib.contextmanager
def staged_output(folder: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = (), command: str = "") -> Iterator[Path]:
    """Claim, stage and publish in one: yield a staging folder that becomes `folder` on success."""
    with claim_output(folder, overwrite=overwrite, inputs=inputs) as claim, claim.stage() as tmp:
        yield tmp
        claim.publish(tmp, command=command)


def write_marker(folder: Path, command: str, failed: str | None = None, files: Iterable[str] | None = None) -> None:
    """The marker listing `files` (default: every file under `folder`) as this tool's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("compressor")
    except PackageNotFoundError:
        __version__ = "unknown"
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    files = sorted(_relative_files(folder)) if files is None else sorted(files)
    _apply_umask(folder)
    marker = {"tool": "compressor", "version": __version__, "command": command, "files": files}
    if failed:
        marker["failed"] = failed
    (folder / MARKER).write_text(json.dumps(marker, indent=1))


def _apply_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the umask's modes: some writers (safetensors,
    mkdtemp) create 0600 / 0700 whatever the umask says."""
    file_mode, dir_mode = umask_mode(0o666), umask_mode(0o777)
    folder.chmod(dir_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


def _check_previous_output_again(folder: Path) -> None:
    """Right before replacing: the folder must still be ours (a user may have dropped files in)."""
    if read_marker(folder) is None:
        raise OutputError(f"output folder `{folder}` changed during the run and no longer holds only this "
                          "tool's files; nothing was replaced; choose another --out")


def _carry_over_and_remove(old: Path, new: Path) -> None:
    """Move files of `old` its marker does not list into `new`, then delete `old` (ours only)."""
    marker = read_marker(old) or {"files": []}
    for rel in foreign_files(old, marker):
        target = new / rel
        if target.exists():
            target = sibling(target, ".user")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(old / rel), str(target))
    shutil.rmtree(old, ignore_errors=True)


def remove_if_ours(folder: Path) -> None:
    """Delete `folder` only if this tool wrote it (it holds the marker and nothing else)."""
    marker = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if marker is not None and not foreign_files(folder, marker):
        shutil.rmtree(folder, ignore_errors=True)


def discard_ours(folder: Path) -> None:
    """Delete the files of `folder` its marker lists (and the marker); user files, and the folders
    holding them, stay. A folder without a marker, or a symlink, is not touched."""
    remove_if_ours(folder)
    marker = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if marker is None:
        return
    for rel in marker["files"]:
        path = folder / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()
    _remove_empty_folders(folder, {rel.split("/")[0] for rel in marker["files"]})
    (folder / MARKER).unlink()


def fresh_sibling(folder: Path, suffix: str) -> Path:
    """A new, empty folder `NAME<suffix>XXXX` beside `folder`, created exclusively (mkdir)."""
    path = Path(tempfile.mkdtemp(prefix=f"{folder.name}{suffix}", dir=folder.parent))
    path.chmod(umask_mode())
    return path


def remove_staging(tmp: Path, err: BaseException | None = None) -> None:
    """Delete a staging folder; when that fails, say where it is so the user can."""
    shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists():
        message = f"could not remove the staging folder `{tmp}`; delete it by hand"
        if isinstance(err, OutputError):
            err.args = (f"{err.args[0]} ({message})",)
        log.warning(message)


def salvage_stale_staging(folder: Path) -> None:
    """Staging folders of a killed run (the lock is ours, so none is in use): move their training
    progress to `NAME.partial` (resumable), then delete them."""
    for stale in folder.parent.glob(f"{staging_name(folder)}*"):
        # Only folders a run staged (they hold its staging marker): a user's `.NAME.tmp-x` stays.
        if stale.is_dir() and not stale.is_symlink() and (stale / STAGING_MARKER).is_file():
            preserve_progress(stale)
            remove_staging(stale)
    for old in folder.parent.glob(f".{folder.name}.old-*"):
        if old.is_dir() and not old.is_symlink() and read_marker(old) is not None:
            _carry_over_and_remove(old, folder) if folder.is_dir() else old.rename(folder)


# Training progress inside an output folder: training.checkpoint's `checkpoints/step-<k>/` and the
# MeZO log. The pipeline stages outputs in `<parent>/.<name>.tmp-XXXX` and deletes that folder when
# a run fails, so an interrupted run would lose them. They move to `<parent>/<name>.partial`.
CHECKPOINT_DIR = "checkpoints"
_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-[^/]+$")
PROGRESS_FILES = (CHECKPOINT_DIR, "mezo_log.jsonl")


def preserve_progress(out_dir: Path | None) -> Path | None:
    """Move checkpoints and the MeZO log out of a staging folder that is about to vanish.

    Their place is `NAME.partial/`: an earlier interruption's progress there (the files its marker
    lists) is replaced, anything else in it is left alone; a `NAME.partial` this tool did not
    write, or whose files collide with the user's, is left untouched and `NAME.partial-XXXX/` is
    used instead. Returns the folder to pass as `resume`, or None when there was nothing to move.
    """
    if out_dir is None:
        return None
    out_dir = Path(out_dir)
    match = _STAGING.match(out_dir.name)
    present = [out_dir / name for name in PROGRESS_FILES if (out_dir / name).exists()]
    if match is None or not present:
        return out_dir if present else None  # not staged: the files stay where they are
    target = out_dir.parent / f"{match['name']}.partial"
    moved = [str(p.relative_to(out_dir)) for path in present for p in [path, *path.rglob("*")] if not p.is_dir()]
    kept = _clear_our_progress(target, moved)
    if kept is None:
        target, kept = fresh_sibling(target.with_name(match["name"]), ".partial-"), []
    target.mkdir(parents=True, exist_ok=True, mode=umask_mode())
    for rel in moved:
        (target / rel).parent.mkdir(parents=True, exist_ok=True, mode=umask_mode())
        os.replace(out_dir / rel, target / rel)
    write_marker(target, "training progress (resume from it)", files=sorted(set(kept) | set(moved)))
    log.info("training stopped early; its progress is in %s (pass it as `resume` to continue)", target)
    return target


def _clear_our_progress(target: Path, incoming: list[str]) -> list[str] | None:
    """Make room in `target` for `incoming` files: delete the progress files its marker lists
    (an earlier interruption's), and return the marker's other files that remain. None when
    `target` cannot take them: not ours, a symlink, or an incoming name is a user's file."""
    if not target.exists() and not target.is_symlink():
        return []
    marker = read_marker(target) if target.is_dir() and not target.is_symlink() else None
    if marker is None:
        return None
    ours = set(marker["files"])
    if any((target / rel).exists() and rel not in ours for rel in incoming):
        return None
    progress = [rel for rel in ours if rel.split("/")[0] in PROGRESS_FILES]
    for rel in progress:
        path = target / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()
    _remove_empty_folders(target, PROGRESS_FILES)
    return sorted((ours - set(progress)) & set(_relative_files(target)))


def _remove_empty_folders(root: Path, names: Iterable[str]) -> None:
    """Delete the empty folders under root/<name> (deepest first); folders with files stay."""
    for name in names:
        top = root / name
        if not top.is_dir() or top.is_symlink():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
