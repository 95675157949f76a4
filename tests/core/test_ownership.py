"""Output folders: markers, locks, foreign files, temporaries, replacing a folder."""

import os
import subprocess
import sys

import pytest

from superdml.core.atomic import atomic_write, remove_stale_temporaries, temp_path
from superdml.core.errors import InputError, OutputLockedError
from superdml.core.ownership import (
    MARKER,
    check_apart,
    claim_output,
    foreign_files,
    owner,
    remove_output,
)


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_new_and_empty_folders_are_claimed_and_marked(tmp_path):
    with claim_output(tmp_path / "a" / "new", "label") as folder:
        assert folder.is_dir()
    (tmp_path / "empty").mkdir()
    with claim_output(tmp_path / "empty", "label"):
        pass
    assert owner(tmp_path / "a" / "new") == owner(tmp_path / "empty") == "label"


def test_a_folder_of_the_users_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="mine: is not empty and was not made by superdml train"):
        with claim_output(tmp_path / "mine", "train"):
            pass
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_another_stages_folder_is_refused_unless_accepted(tmp_path):
    with claim_output(tmp_path / "run", "label"):
        pass
    with pytest.raises(InputError, match="is the output of superdml label, not train"):
        with claim_output(tmp_path / "run", "train"):
            pass
    with claim_output(tmp_path / "run", "export", accept=("label",)):
        pass
    assert owner(tmp_path / "run") == "label"


def test_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="f: is a file"):
        with claim_output(tmp_path / "f", "segment"):
            pass


def test_second_claim_of_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    with claim_output(tmp_path / "run", "label"):
        with pytest.raises(
            OutputLockedError, match=rf"in use by another superdml run \(pid {os.getpid()}\)"
        ):
            with claim_output(tmp_path / "run", "label"):
                pass
    with claim_output(tmp_path / "run", "label"):  # released
        pass


def test_lock_held_by_another_process(tmp_path):
    folder = tmp_path / "run"
    code = (
        "import sys, time; from superdml.core.ownership import claim_output\n"
        f"with claim_output({str(folder)!r}, 'label'):\n"
        "    print('held', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            with claim_output(folder, "label"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with claim_output(folder, "label"):  # a killed holder leaves no lock behind
        pass


def test_only_our_temporaries_of_dead_processes_are_removed(tmp_path):
    pid = dead_pid()
    users = [tmp_path / "photos.tmp-2023", tmp_path / "a.tmp-1", tmp_path / "sub" / "x.sdml-tmp"]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    stale = tmp_path / "sub" / f"part.parquet.sdml-tmp-{pid}"
    stale.write_text("half")
    live = temp_path(tmp_path / "being-written.tif")  # this process's: still being written
    live.write_text("x")
    remove_stale_temporaries(tmp_path)
    assert all(p.exists() for p in users) and live.exists() and not stale.exists()


def test_interrupted_folder_replace_puts_the_old_copy_back(tmp_path):
    ref = tmp_path / "ref"
    with claim_output(ref, "index"):
        (ref / "embeddings.npy").write_text("old")
    # killed between "old aside" and "new in place": only the aside copy exists
    os.replace(ref, tmp_path / f".ref.sdml-old-{dead_pid()}")
    (tmp_path / f"ref.sdml-tmp-{dead_pid()}").mkdir()  # the half-written new copy
    with claim_output(ref, "index"):
        assert (ref / "embeddings.npy").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]


def test_atomic_folder_replace_leaves_nothing_aside(tmp_path):
    final = tmp_path / "ref"
    for text in ("one", "two"):
        with atomic_write(final) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text(text)
    assert (final / "data").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]


def test_remove_output_refuses_foreign_files(tmp_path):
    with claim_output(tmp_path / "model", "train") as folder:
        (folder / "best.pt").write_text("w")
        (folder / "tb").mkdir()
        (folder / "tb" / "events").write_text("e")
    (folder / "notes.txt").write_text("mine")
    assert foreign_files(folder, ["best.pt", "tb/*"]) == ["notes.txt"]
    with pytest.raises(InputError, match="holds notes.txt, which superdml train did not write"):
        remove_output(folder, "train", ["best.pt", "tb/*"])
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "best.pt").exists()
    (folder / "notes.txt").unlink()
    remove_output(folder, "train", ["best.pt", "tb/*"])
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_remove_output_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "best.pt").write_text("mine")
    with pytest.raises(InputError, match="was not made by superdml train"):
        remove_output(tmp_path / "precious", "train", ["best.pt"])
    assert (tmp_path / "precious" / "best.pt").read_text() == "mine"
    assert not (tmp_path / "precious" / MARKER).exists()


@pytest.mark.parametrize(
    ("out", "inputs"),
    [("a", ["a"]), ("a", ["a/b/c.tif"]), ("a/b", ["a"])],
    ids=["is", "contains", "inside"],
)
def test_outputs_overlapping_inputs_are_refused(tmp_path, out, inputs):
    with pytest.raises(InputError, match="overlaps the input"):
        check_apart(tmp_path / out, [tmp_path / p for p in inputs])


def test_sibling_output_is_fine(tmp_path):
    check_apart(tmp_path / "ab", [tmp_path / "a", tmp_path / "a.tif"])
