"""The review page in a real browser (Playwright + the system's Chromium), keys only.

Without a Chromium these tests skip, except in CI (``CI=true``), where they fail.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from processes import child_env

from superdml.config.load import dump_config
from superdml.config.schema import LabelConfig, ReviewConfig, TrainConfig
from superdml.label.export import export
from superdml.label.review import review
from superdml.label.stage import label
from superdml.serve.folder import open_folder
from superdml.serve.journal import JOURNAL, live_batches, read_journal
from superdml.serve.server import ServeOptions, bind, open_session

BROWSERS = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
REPO = Path(__file__).resolve().parents[2]


def chromium_path():
    found = os.environ.get("SUPERDML_CHROMIUM") or next(
        (p for p in BROWSERS if os.path.exists(p)), None
    )
    if found is None:
        message = f"no Chromium at {BROWSERS} (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if os.environ.get("CI") != "true":
        pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def world(shared_world, tmp_path_factory):
    """The shared world's mosaic, segments, crops and model, labeled, exported and reviewed.

    ``model/`` is a training folder (``best.pt`` untrained, ``train.yaml`` of one tiny
    epoch), so the page's Retrain has a previous model to start from.
    """
    root = shared_world.copy_to(tmp_path_factory.mktemp("serve"))
    (root / "model").mkdir()
    shutil.copy(root / "model.pt", root / "model" / "best.pt")
    config = TrainConfig(
        epochs=1, input_size=32, embedding_size=16, classes_per_batch=4, samples_per_class=4,
        warmup_epochs=0, normalization="imagenet", num_workers=0,
        loss="proxy_nca",  # the untrained checkpoint has no proxy_anchor proxies to keep
    )  # fmt: skip
    dump_config(config, root / "model" / "train.yaml")
    label_config = LabelConfig(
        k=5, tile_size=128, batch_size=64, precision="fp32", keep_embeddings=True
    )
    label(
        root / "seg",
        root / "model" / "best.pt",
        root / "ref",
        root / "labels",
        label_config,
        device="cpu",
    )
    export(root / "labels", root / "seg", "gtiff", "none")
    review(root / "labels", root / "seg", root / "review", ReviewConfig(max_score=1.0, limit=60))
    return root


@pytest.fixture
def folders(world, tmp_path):
    """A fresh copy of the review folder and of the training folder (the crops)."""
    shutil.copytree(world / "review", tmp_path / "review")
    shutil.copytree(world / "crops", tmp_path / "train", ignore=shutil.ignore_patterns("*.parquet"))
    return tmp_path / "review", tmp_path / "train"


@contextlib.contextmanager
def server_thread(review_dir, train_dir, **options):
    """Serve in a thread of this process; yield the page's URL."""
    import uvicorn

    from superdml.serve.app import make_app

    session = open_session(review_dir, train_dir, ServeOptions(port=0, device="cpu", **options))
    sock = bind(0)
    server = uvicorn.Server(uvicorn.Config(make_app(session), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/?token={session.token}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def server_process(review_dir, train_dir):
    """Serve in a real ``superdml serve`` process; yield (process, URL)."""
    env = child_env(PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-c", "from superdml.cli.commands import main; main()", "serve",
        str(review_dir), "--train-dir", str(train_dir), "--port", "0", "--device", "cpu",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    try:
        line = process.stdout.readline()
        found = re.search(r"http://\S+", line)
        assert found, line + process.stdout.read()
        yield process, found.group(0)
    finally:
        process.kill()
        process.wait()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 850})
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=20000)
    return page


def grid(page):
    """The grid's crops in order, and the focused one's position."""
    cells = page.eval_on_selector_all(
        ".crop", "cs => cs.map(c => [c.dataset.file, c.classList.contains('focus')])"
    )
    return [file for file, _ in cells], [focus for _, focus in cells].index(True)


def press(page, key):
    """Press a key that makes a decision; wait until the page acknowledged it."""
    before = int(page.get_attribute("body", "data-ack"))
    page.keyboard.press(key)
    page.wait_for_selector(f"body[data-ack='{before + 1}'][data-busy='0']", state="attached")


def predicted(file):
    """The class a review crop was predicted (its folder in the review)."""
    return file.split("/")[0]


def test_sort_30_crops_with_the_keyboard(browser, folders, tmp_path):
    review_dir, train_dir = folders
    classes = open_folder(review_dir, train_dir).classes  # the order of the number keys
    before = {p.relative_to(train_dir).as_posix() for p in train_dir.rglob("*.png")}
    expected = {}  # crop file -> class
    with server_thread(review_dir, train_dir) as url:
        page = open_page(browser, url)
        for k in range(24):  # one by one, a number key each
            files, focus = grid(page)
            expected[files[focus]] = classes[k % 4]
            press(page, str(k % 4 + 1))
        files, focus = grid(page)
        page.keyboard.press("ArrowRight")
        for _ in range(3):  # a range of four, one key
            page.keyboard.press("Shift+ArrowRight")
        expected.update({f: classes[1] for f in files[focus + 1 : focus + 5]})
        press(page, "2")
        for _ in range(2):  # accept the prediction
            files, focus = grid(page)
            expected[files[focus]] = predicted(files[focus])
            press(page, "Enter")
        files, focus = grid(page)
        skipped = files[focus]
        press(page, "s")
        files, focus = grid(page)
        undone = files[focus]
        press(page, "3")
        press(page, "u")  # the last sort goes back to the queue, focused again
        assert grid(page)[0][grid(page)[1]] == undone
        page.keyboard.press("?")
        assert page.is_visible("#help")
        page.keyboard.press("Escape")
        assert "30 sorted" in page.text_content("#counts")
        page.screenshot(path=str(tmp_path / "serve.png"))
        if os.environ.get("SUPERDML_DOCS"):
            shutil.copy(tmp_path / "serve.png", REPO / "docs" / "serve.png")
        page.close()
    assert len(expected) == 30
    after = {p.relative_to(train_dir).as_posix() for p in train_dir.rglob("*.png")}
    assert after - before == {f"{cls}/{Path(f).name}" for f, cls in expected.items()}
    left = {p.relative_to(review_dir).as_posix() for p in review_dir.rglob("*.png")}
    assert not left & set(expected) and {skipped, undone} <= left
    records = read_journal(review_dir / JOURNAL)
    live = [r for batch in live_batches(records) for r in batch]
    assert {r.crop: r.cls for r in live if r.op == "sort"} == expected
    assert [r.crop for r in live if r.op == "skip"] == [skipped]
    assert [r.op for r in records].count("undo") == 1
    assert len({r.batch for r in records if r.op == "sort"}) == 24 + 1 + 2 + 1


def test_a_killed_server_keeps_every_acknowledged_decision(browser, folders):
    review_dir, train_dir = folders
    sorted_files = []
    with server_process(review_dir, train_dir) as (process, url):
        page = open_page(browser, url)
        for key in "12341":
            files, focus = grid(page)
            sorted_files.append(files[focus])
            press(page, key)
        process.kill()  # SIGKILL: no shutdown handler runs
        process.wait()
        page.close()
    for file in sorted_files:
        assert not (review_dir / file).exists()
    placed = {p.name: p.parent.name for p in train_dir.rglob("*.png")}
    classes = open_folder(review_dir, train_dir).classes  # the order of the number keys
    assert [placed[Path(f).name] for f in sorted_files] == [classes[int(k) - 1] for k in "12341"]
    with server_process(review_dir, train_dir) as (process, url):
        page = open_page(browser, url)
        assert "5 sorted" in page.text_content("#counts")
        press(page, "u")
        assert (review_dir / sorted_files[-1]).is_file()
        assert grid(page)[0][grid(page)[1]] == sorted_files[-1]
        assert "4 sorted" in page.text_content("#counts")
        page.close()
    records = read_journal(review_dir / JOURNAL)
    assert [r.op for r in records] == ["sort"] * 5 + ["undo"]


def test_more_like_this_collects_superpixels_of_the_whole_mosaic(folders):
    """Kept and on-demand embeddings agree; found superpixels become crops of the folder."""
    import dataclasses

    import numpy as np

    from superdml.serve.app import _mosaic
    from superdml.serve.queue import MORE, PENDING, SORTED, read_more
    from superdml.serve.similar import MosaicEmbeddings, more_like

    review_dir, train_dir = folders
    session = open_session(review_dir, train_dir, ServeOptions(port=0, device="cpu"))
    served, sorter = session.served, session.sorter
    mosaic = _mosaic(session)
    mosaic.build()
    assert mosaic.done == mosaic.total and mosaic.kept == mosaic.total  # every tile was kept
    fresh = MosaicEmbeddings(
        list(served.runs.values()), dataclasses.replace(mosaic.model, kept_from=None),
        served.label_run, train_dir,
    )  # fmt: skip
    fresh.build()
    assert fresh.kept == 0 and np.allclose(fresh.embeddings, mosaic.embeddings, atol=1e-5)
    n_crops, i = len(served.queue), int(served.queue.pending(0, 1)[0])
    found = more_like(mosaic, sorter, served.runs, i, 40)
    assert len(found) == 40 and i not in found
    assert (served.queue.state[found] == PENDING).all()
    rows = mosaic.rows_of(served.queue.raster[found], served.queue.segment_id[found])
    focus = mosaic.rows_of(served.queue.raster[[i]], served.queue.segment_id[[i]])[0]
    similarity = mosaic.embeddings[rows] @ mosaic.embeddings[focus]
    assert (np.diff(similarity) <= 1e-6).all()  # most similar first
    others = mosaic.similar(focus, len(mosaic.keys), np.zeros(0, np.int64))
    assert similarity[-1] >= (mosaic.embeddings[others] @ mosaic.embeddings[focus])[39] - 1e-6
    new = [j for j in found if j >= n_crops]
    assert new, "the review folder's 60 crops are few of the mosaic's superpixels"
    files = [served.queue.file[j] for j in new]
    assert all(f.startswith("more/") and (review_dir / f).is_file() for f in files)
    assert [r["file"] for r in read_more(review_dir / MORE)] == files
    in_train = {p.stem for p in train_dir.rglob("*.png")}
    assert not {Path(served.queue.file[j]).stem for j in found} & in_train
    # a found crop is a crop like the others: sorted, journaled, and back after a restart
    cls = served.classes[0]
    sorter.sort(new[:2], cls)
    assert all((train_dir / cls / Path(f).name).is_file() for f in files[:2])
    assert not (review_dir / files[0]).exists()
    again = open_session(review_dir, train_dir, ServeOptions(port=0, device="cpu"))
    assert list(again.served.queue.file[new]) == files
    assert list(again.served.queue.state[new[:2]]) == [SORTED, SORTED]
    assert again.sorter.undo() == new[:2]
    assert (review_dir / files[0]).is_file() and not (
        train_dir / cls / Path(files[0]).name
    ).exists()
    # asking again lists no crop twice and writes nothing over a crop
    assert sorted(more_like(mosaic, again.sorter, again.served.runs, i, 40)) == sorted(found)
    assert len(read_more(review_dir / MORE)) == len(files)


@pytest.mark.slow
def test_retrain_uses_exactly_the_decisions_the_page_named(browser, folders, tmp_path):
    review_dir, train_dir = folders
    retrain_dir = tmp_path / "retrain"
    with server_thread(review_dir, train_dir, epochs=1, workers=0, retrain_dir=retrain_dir) as url:
        page = open_page(browser, url)
        for key in "123412":
            press(page, key)
        page.click("#retrain-btn")
        page.wait_for_selector("#retrain[data-state='running']", state="attached")
        press(page, "3")  # sorting goes on during the run, into the real folder
        ended = "#retrain[data-state='done'], #retrain[data-state='failed']"
        page.wait_for_selector(ended, state="attached", timeout=420000)  # minutes when shared
        state = page.get_attribute("#retrain", "data-state")
        assert state == "done", page.text_content("#retrain-log")
        page.wait_for_selector("#metrics tbody tr", state="attached")
        includes = page.text_content("#retrain-includes")
        shown = {
            row[0]: (float(row[1]), float(row[2]))
            for row in page.eval_on_selector_all(
                "#metrics tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))"
            )
        }
        # the new run's least certain superpixels are the next queue, on this page
        with page.expect_navigation(timeout=120000):
            page.click("#next-queue-btn")
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60000)
        next_folder = page.text_content("#folder")
        press(page, "1")
        page.close()
    assert next_folder.startswith(str(retrain_dir / "round-1" / "review"))
    [sorted_next] = read_journal(retrain_dir / "round-1" / "review" / JOURNAL)
    assert (
        Path(sorted_next.target).is_file() and Path(sorted_next.target).parent.parent == train_dir
    )
    assert "decisions 1–6" in includes and "6 sorted crops" in includes
    round_dir = retrain_dir / "round-1"
    for name, (before, after) in shown.items():
        stored_before = json.loads((round_dir / "before" / "metrics.json").read_text())["metrics"]
        stored_after = json.loads((round_dir / "after" / "metrics.json").read_text())["metrics"]
        assert before == pytest.approx(stored_before[name], abs=1e-4)
        assert after == pytest.approx(stored_after[name], abs=1e-4)
    assert "precision_at_1" in shown or "map_at_r" in shown
    # the new reference holds the training crops and exactly the six sorted before the click
    sorts = [r for b in live_batches(read_journal(review_dir / JOURNAL)) for r in b]
    first_six = {f"{r.cls}/{Path(r.target).name}" for r in sorts[:6]}
    seventh = f"{sorts[6].cls}/{Path(sorts[6].target).name}"
    files = set(json.loads((round_dir / "reference" / "files.json").read_text()))
    original = {p.relative_to(train_dir).as_posix() for p in train_dir.rglob("*.png")} - first_six
    original -= {seventh, f"{sorted_next.cls}/{Path(sorted_next.target).name}"}
    assert files == original | first_six
    train_yaml = (round_dir / "model" / "train.yaml").read_text()
    assert "epochs: 1" in train_yaml
