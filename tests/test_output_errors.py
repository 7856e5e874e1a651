"""Every output as safe as a checkpoint: a read-only, immutable, busy or full target is one ``error:`` line that
names the output and the cause, with no traceback and no partial file left; a killed run's partials are removed by
the next run into the folder. CI runs as root, whom ``chmod`` does not stop: unwritable folders are simulated by
patching the OS calls (:func:`unwritable`), and a full disk is a small tmpfs where the test may mount one."""
from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_frame, tmpfs

from metric_ds import outputs
from metric_ds.cli import build_parser, main
from metric_ds.commands import COMMANDS
from metric_ds.errors import UserError, describe_io_error

OUTPUT_FLAGS = ("--output", "--out")
# commands without an output option, and why: train writes to the config's checkpointing.checkpoints_dir
# (checked by the preflight), validate and env print only
NO_OUTPUT = {"train", "validate", "env", "calibrate"}  # calibrate writes into --model: tests/test_open_set.py


def _under(path: object, folder: Path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    p = Path(os.fsdecode(path)).absolute()
    return p == folder or folder in p.parents


def unwritable(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Make every write under ``folder`` (creating a folder, opening a file to write, renaming into it) fail with
    ``code``, as a read-only (EROFS), immutable (EPERM) or full (ENOSPC) file system would."""
    folder = folder.absolute()
    real_open, real_os_open, real_mkdir, real_replace, real_rename = (
        builtins.open, os.open, os.mkdir, os.replace, os.rename)

    def fail(path: object) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _under(file, folder):
            raise fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, folder):
            raise fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if _under(path, folder):
            raise fail(path)
        return real_mkdir(path, *args, **kwargs)

    def guard(real):
        def renamed(src, dst, *args, **kwargs):
            if _under(dst, folder):
                raise fail(dst)
            return real(src, dst, *args, **kwargs)
        return renamed

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", guard(real_replace))
    monkeypatch.setattr(os, "rename", guard(real_rename))


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    """The one ``error:`` line on stderr, after checking there is no traceback and that it holds ``words``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ the helpers


def test_describe_io_error_reads_the_errno_of_library_errors(tmp_path):
    assert describe_io_error(OSError(errno.EROFS, "x"), tmp_path) == "read-only file system"
    text = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors
    assert describe_io_error(RuntimeError(text), tmp_path) == "no space left on device"
    assert describe_io_error(OSError("Error writing bytes. Detail: [errno 30] x"), tmp_path) == "read-only file system"


def test_atomic_output_turns_oserror_into_one_user_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(UserError, match=rf"could not write --output {target}: no space left on device; free"), \
            outputs.atomic_output(target, what="--output ") as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with outputs.atomic_output(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    dead, live = dead_pid(), os.getpid()
    names = [f".pred.partial-{dead}.parquet", f".emb.partial-{dead}.npy", f".out.csv.{dead}.tmp",
             f".export.partial-{dead}", f".pred.partial-{live}.parquet", ".notes.partial-x.txt", "keep.parquet"]
    for name in names:
        (tmp_path / name).mkdir() if "export" in name else (tmp_path / name).write_text("x")
    assert sorted(p.name for p in outputs.remove_stale_partials(tmp_path)) == sorted(names[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[4:])


# --------------------------------------------------------------------------------- every command, unwritable


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    table = root / "table.parquet"
    make_frame(24).to_parquet(table)
    unlabelled = make_frame(30, num_classes=3).drop(columns=["metric_mask", "classifier_mask"])
    unlabelled.loc[unlabelled.index % 3 != 0, "label"] = None
    pl = root / "pl.csv"
    unlabelled.to_csv(pl, index=False)
    return {"table": table, "pl": pl}


def command_lines(tiny_run: Path, inputs: dict[str, Path], out: Path) -> dict[str, tuple[list[str], Path]]:
    """For each command with an output option: a command line that reaches its write, and the output it names."""
    best, cpu = str(tiny_run / "best"), ["--device", "cpu"]
    pl = ["pseudo-label", "--input", str(inputs["pl"]), "--model", best, "--min-purity", "0", "--min-labelled", "1"]
    lines = {
        "prepare": (["prepare", "--input", str(inputs["table"])], out / "prepared.parquet"),
        "evaluate": (["evaluate", "--model", best, "--data", str(inputs["table"]), *cpu], out / "eval.json"),
        "export": (["export", str(tiny_run), "--format", "st"], out / "st"),
        "predict": (["predict", "--model", best, "--input", str(inputs["table"]), *cpu], out / "pred.csv"),
        "embed": (["embed", "--model", best, "--input", str(inputs["table"]), *cpu], out / "emb.npy"),
        "pseudo-label": (pl, out / "pl.parquet"),
        "report": (["report", str(tiny_run)], out / "report"),
    }
    flags = {name: next(f for f in OUTPUT_FLAGS if f in parser_flags(name)) for name in lines}
    return {name: ([*argv, flags[name], str(path)], path) for name, (argv, path) in lines.items()}


def parser_flags(command: str) -> set[str]:
    sub = next(a for a in build_parser([command])._actions if a.dest == "command")
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


def test_every_command_with_an_output_is_walked(tmp_path):
    with_output = {name for name in COMMANDS if parser_flags(name) & set(OUTPUT_FLAGS)}
    assert with_output | NO_OUTPUT == set(COMMANDS), "a new command: add it to NO_OUTPUT or to command_lines"
    assert with_output == set(command_lines(Path("run"), {"table": Path("t"), "pl": Path("p")}, tmp_path)), \
        "a new command with an output: add a command line that reaches its write to command_lines"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EPERM])
@pytest.mark.parametrize("folder_exists", [False, True], ids=["new-folder", "existing-folder"])
@pytest.mark.parametrize("command", sorted(set(COMMANDS) - NO_OUTPUT))
def test_an_unwritable_output_is_one_error_line(tmp_path, tiny_run, inputs, monkeypatch, capsys, command,
                                                folder_exists, code):
    out = tmp_path / "locked"
    if folder_exists:
        out.mkdir()
    argv, target = command_lines(tiny_run, inputs, out)[command]
    unwritable(monkeypatch, out, code)
    assert main(argv) == 1
    one_error(capsys, str(target), os.strerror(code).lower())
    monkeypatch.undo()
    assert not out.exists() or list(out.iterdir()) == []  # no partial left


def test_an_unwritable_pseudo_label_summary_is_one_error_line(tmp_path, tiny_run, inputs, monkeypatch, capsys):
    argv, _ = command_lines(tiny_run, inputs, tmp_path)["pseudo-label"]
    summary = tmp_path / "locked" / "summary.json"
    unwritable(monkeypatch, summary.parent, errno.EROFS)
    assert main([*argv, "--summary", str(summary)]) == 1
    one_error(capsys, f"--summary {summary}", "read-only file system")


# ------------------------------------------------------------------------------------------------ a full disk


@pytest.fixture
def full_disk(tmp_path) -> Iterator[Path]:
    """A tmpfs of 256 KiB, filled: every write into it fails with ENOSPC. Skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "full", "256k") as mnt:
        with open(mnt / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        yield mnt


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - NO_OUTPUT))
def test_a_full_disk_is_one_error_line(full_disk, tiny_run, inputs, capsys, command):
    argv, target = command_lines(tiny_run, inputs, full_disk)[command]
    assert main(argv) == 1
    one_error(capsys, str(target), "no space left on device")
    kept = {"filler", target.name} if command == "report" else {"filler"}  # a report is rewritten in place
    assert {p.name for p in full_disk.iterdir()} <= kept


@pytest.mark.parametrize("command", ["predict", "embed", "pseudo-label"])
def test_a_full_disk_midway_is_one_error_line(tmp_path, tiny_run, inputs, monkeypatch, capsys, command):
    """Without a tmpfs: the writer itself runs out of space after the partial file exists."""
    from metric_ds.data import stream

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    argv, target = command_lines(tiny_run, inputs, tmp_path / "out")[command]
    monkeypatch.setattr(stream.TableWriter, "write", full)
    monkeypatch.setattr(stream.NpyWriter, "write", full)
    monkeypatch.setattr("pandas.DataFrame.to_parquet", full)
    assert main(argv) == 1
    one_error(capsys, str(target), "no space left on device")
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------------- partials of a killed run


@pytest.mark.parametrize("command, partial", [
    ("predict", ".pred.partial-{}.csv"), ("embed", ".emb.partial-{}.npy"), ("pseudo-label", ".pl.partial-{}.parquet"),
    ("pseudo-label", ".pl.parquet.{}.tmp"),
])
def test_the_next_run_removes_a_killed_runs_partial(tmp_path, tiny_run, inputs, capsys, command, partial):
    out = tmp_path / "out"
    out.mkdir()
    # the command runs in this process, whose own partial has this process's id: the live one is the parent's
    dead, live = out / partial.format(dead_pid()), out / partial.format(os.getppid())
    dead.write_text("killed midway")
    live.write_text("still being written")
    argv, target = command_lines(tiny_run, inputs, out)[command]
    assert main(argv) == 0, capsys.readouterr().err
    assert target.is_file() and not dead.exists() and live.exists()


def test_only_our_partials_are_taken_for_stale(tmp_path):
    """A user's own hidden .tmp file is not a partial, whatever its name's number."""
    from metric_ds.outputs import remove_stale_partials

    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    ours, theirs = tmp_path / f".out.csv.{dead}.tmp", tmp_path / f".my.notes.{dead}.tmp"
    ours.write_text("x"), theirs.write_text("y")
    remove_stale_partials(tmp_path)
    assert not ours.exists() and theirs.exists()
