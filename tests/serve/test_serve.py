"""superdml serve without a browser: journal, moves, undo, recovery, guards, tiles, CLI errors."""

import json
import os
import socket

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image
from rasters import write_raster

from superdml.cli.commands import cli
from superdml.core.errors import InputError
from superdml.crops.folder import write_crops, write_crops_table
from superdml.serve.app import make_app
from superdml.serve.decisions import Sorter, move_no_replace
from superdml.serve.folder import open_folder
from superdml.serve.journal import JOURNAL, live_batches, read_journal
from superdml.serve.queue import PENDING, SKIPPED, SORTED, read_queue
from superdml.serve.security import confined
from superdml.serve.server import ServeOptions, bind, open_session
from superdml.serve.tiles import image_tile, max_zoom, tile_window

CLASSES = ["forest", "water", "field"]


@pytest.fixture
def folder(tmp_path):
    """A review-like crop folder of 12 crops (no label run), and a training folder."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (12, 3, 8, 8), dtype=np.uint8)
    ids = np.arange(1, 13, dtype=np.uint32)
    table = pa.table({"segment_id": ids, "x": ids * 1.0, "y": ids * 2.0})
    labels = [CLASSES[i % 3] for i in range(12)]
    score = np.linspace(0.9, 0.2, 12)  # the last crop is the least certain
    rows = write_crops(
        tmp_path / "review", "r", table, crops, labels, score=score, margin=score / 2
    )
    write_crops_table(tmp_path / "review", rows, {})
    train = tmp_path / "train"
    for name in CLASSES:
        (train / name).mkdir(parents=True)
    Image.fromarray(crops[0].transpose(1, 2, 0)).save(train / "water" / "own.png")
    return tmp_path / "review", train


def sorter_of(folder):
    served = open_folder(*folder)
    return Sorter(served.folder, served.queue, served.train_dir, served.classes)


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_queue_is_least_certain_first(folder):
    queue = read_queue(folder[0])
    assert list(queue.score[queue.order]) == sorted(queue.score)
    assert list(queue.pending(0, 3)) == [11, 10, 9]


def test_sort_moves_the_crop_and_journals_it_first(folder):
    review, train = folder
    sorter = sorter_of(folder)
    i = int(sorter.queue.pending(0, 1)[0])
    name = sorter.queue.file[i]
    [record] = sorter.sort([i], "forest")
    assert not (review / name).exists()
    assert (train / "forest" / os.path.basename(name)).is_file()
    [stored] = read_journal(review / JOURNAL)
    assert stored == record
    assert (stored.op, stored.cls, stored.crop) == ("sort", "forest", name)
    assert stored.predicted == sorter.queue.predicted[i]
    assert stored.score == pytest.approx(float(sorter.queue.score[i]), abs=1e-6)
    assert sorter.queue.state[i] == SORTED


def test_accept_range_skip_undo_and_restart(folder):
    review, train = folder
    sorter = sorter_of(folder)
    first = [int(i) for i in sorter.queue.pending(0, 4)]
    sorter.sort(first[:3], "", accept=True)
    sorter.skip([first[3]])
    for i in first[:3]:
        predicted = sorter.queue.predicted[i]
        assert (train / predicted / os.path.basename(sorter.queue.file[i])).is_file()
    # a new server reads the same state from the journal; undo reverts the skip, then the range
    again = sorter_of(folder)
    assert list(again.queue.state[first]) == [SORTED, SORTED, SORTED, SKIPPED]
    assert again.undo() == [first[3]]
    assert again.undo() == first[:3]
    assert again.undo() == []
    assert list(again.queue.state[first]) == [PENDING] * 4
    assert files_under(train) == ["water/own.png"]
    assert len(files_under(review)) == 12
    assert live_batches(read_journal(review / JOURNAL)) == []


def test_an_existing_target_is_never_overwritten(folder):
    review, train = folder
    sorter = sorter_of(folder)
    i = int(sorter.queue.pending(0, 1)[0])
    target = train / "water" / os.path.basename(sorter.queue.file[i])
    target.write_bytes(b"the user's own file")
    with pytest.raises(InputError, match="exists"):
        sorter.sort([i], "water")
    assert target.read_bytes() == b"the user's own file"
    assert (review / sorter.queue.file[i]).is_file()
    assert not (review / JOURNAL).exists()
    with pytest.raises(FileExistsError):
        move_no_replace(review / sorter.queue.file[i], target)


def test_unknown_class_and_decided_crop_are_refused(folder):
    sorter = sorter_of(folder)
    i = int(sorter.queue.pending(0, 1)[0])
    with pytest.raises(InputError, match="no class 'lake'"):
        sorter.sort([i], "lake")
    sorter.skip([i])
    with pytest.raises(InputError, match="already decided"):
        sorter.sort([i], "water")


def test_restart_rolls_journaled_moves_forward(folder):
    """A server killed between the journal's fsync and the move: the restart moves it."""
    review, train = folder
    sorter = sorter_of(folder)
    i, j = (int(k) for k in sorter.queue.pending(0, 2))
    [a] = sorter.sort([i], "field")
    [b] = sorter.sort([j], "field")
    os.link(b.target, b.source)  # j: cut between link and unlink
    os.rename(a.target, a.source)  # i: journaled, never moved
    again = sorter_of(folder)
    assert os.path.isfile(a.target) and not os.path.exists(a.source)
    assert os.path.isfile(b.target) and not os.path.exists(b.source)
    assert again.location(i) == train.resolve() / "field" / os.path.basename(a.crop)


def test_a_torn_last_line_is_ignored_and_repaired(folder):
    review, _ = folder
    sorter = sorter_of(folder)
    sorter.skip([int(sorter.queue.pending(0, 1)[0])])
    with open(review / JOURNAL, "a") as f:
        f.write('{"seq": 2, "op": "so')
    again = sorter_of(folder)
    assert again.queue.counts() == {"pending": 11, "sorted": 0, "skipped": 1}
    again.skip([int(again.queue.pending(0, 1)[0])])
    assert [r.seq for r in read_journal(review / JOURNAL)] == [1, 2]


# ------------------------------------------------------------------------ guards


def test_confined_refuses_paths_outside_the_root(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")
    root = tmp_path / "root"
    assert confined(root, "a/x.png") == (root / "a" / "x.png").resolve()
    for bad in ["../secret.png", "a/../../secret.png", str(tmp_path / "secret.png"),
                "/etc/passwd", "link.png", "a\\..\\..\\secret.png", "", "a"]:  # fmt: skip
        assert confined(root, bad) is None, bad


@pytest.fixture
def client(folder):
    from starlette.testclient import TestClient

    session = open_session(*folder, ServeOptions(port=0))
    with TestClient(make_app(session), base_url="http://127.0.0.1") as test_client:
        yield test_client, session


def test_requests_without_the_token_are_refused(client):
    test_client, session = client
    token = session.token
    i = int(session.served.queue.pending(0, 1)[0])
    crop = f"/files/crops/{session.served.queue.file[i]}"
    assert test_client.get(f"{crop}?token={token}").status_code == 200
    assert test_client.get(crop).status_code == 200  # the page's cookie
    test_client.cookies.clear()
    for path in ["/", "/api/info", "/api/queue", crop, "/static/app.js"]:
        assert test_client.get(path).status_code == 403, path
        assert test_client.get(f"{path}?token=wrong").status_code == 403, path
    # a write needs the header: the token in the URL (or a cookie) is not enough
    refused = test_client.post(f"/api/skip?token={token}", json={"ids": [i]})
    assert refused.status_code == 403
    test_client.cookies.clear()
    assert test_client.post("/api/skip", json={"ids": [i]}).status_code == 403
    assert session.served.queue.state[i] == PENDING
    done = test_client.post("/api/skip", json={"ids": [i]}, headers={"X-SuperDML-Token": token})
    assert done.status_code == 200 and session.served.queue.state[i] == SKIPPED
    other_host = test_client.get(f"/api/info?token={token}", headers={"host": "evil.example"})
    assert other_host.status_code == 400


def test_file_requests_outside_the_served_folders_are_refused(client, tmp_path):
    test_client, session = client
    (tmp_path / "secret.png").write_bytes(b"secret")
    headers = {"X-SuperDML-Token": session.token}
    for path in [
        "/files/crops/%2e%2e/train/water/own.png",
        "/files/crops/%2e%2e/secret.png",
        "/files/crops/..%2f..%2fsecret.png",
        f"/files/crops/{tmp_path}/secret.png",
        f"/files/crops/%2F{str(tmp_path / 'secret.png').lstrip('/')}",
        "/files/train/../review/crops.parquet",
        "/files/other/water/own.png",
        "/static/../journal.py",
        "/static/%2e%2e/journal.py",
    ]:
        response = test_client.get(path, headers=headers)
        assert response.status_code in (403, 404), path
        assert b"secret" not in response.content and b"import" not in response.content, path
    assert test_client.get("/files/train/water/own.png", headers=headers).status_code == 200


def test_page_api_sorts_and_undoes(client):
    test_client, session = client
    headers = {"X-SuperDML-Token": session.token}
    page = test_client.get("/api/queue?n=5", headers=headers).json()
    ids = [item["id"] for item in page["items"]]
    assert ids == [int(i) for i in session.served.queue.pending(0, 5)]
    done = test_client.post("/api/sort", json={"ids": ids[:2], "class": "water"}, headers=headers)
    assert done.json()["counts"]["sorted"] == 2
    bad = test_client.post("/api/sort", json={"ids": ids[:1], "class": "water"}, headers=headers)
    assert bad.status_code == 409 and "already decided" in bad.json()["error"]
    assert test_client.post("/api/undo", json={}, headers=headers).json()["undone"] == ids[:2]


# ------------------------------------------------------------------------- tiles


def test_tile_window_covers_the_raster_at_every_zoom():
    assert max_zoom(256, 256) == 0 and max_zoom(1000, 300) == 2
    assert tile_window(2, 0, 0, 1000, 300)[0].width == 256
    window, shape = tile_window(2, 1, 3, 1000, 300)
    assert (window.col_off, window.row_off, window.width, window.height) == (256, 768, 44, 232)
    assert shape == (232, 44)
    window, shape = tile_window(0, 0, 0, 1000, 300)  # one tile, 4x decimated
    assert (window.width, window.height, shape) == (300, 1000, (250, 75))
    assert tile_window(2, 2, 0, 1000, 300) is None and tile_window(3, 0, 0, 1000, 300) is None


def test_image_tile_holds_the_raster_pixels(tmp_path):
    from superdml.config.schema import SegmentConfig
    from superdml.segment.stage import segment_raster

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 300, 300), dtype=np.uint8)
    pixels[:, :, :] = np.clip(pixels, 1, 254)  # so the band ranges are 1..254 in each band
    pixels[:, 0, 0], pixels[:, 0, 1] = 0, 255
    source = write_raster(tmp_path / "m.tif", pixels)
    seg = segment_raster(source, tmp_path / "seg", SegmentConfig(region_size=32, tile_size=256))
    from superdml.segment.run import load_segment_runs

    [run] = load_segment_runs(seg.out_dir)
    import io

    full = np.asarray(Image.open(io.BytesIO(image_tile(run, [0, 1, 2], 1, 1, 0))))
    lo, hi = np.asarray(run.band_lo), np.asarray(run.band_hi)
    expected = np.clip(
        (pixels[:, :256, 256:300] - lo[:, None, None]) * 255 / (hi - lo)[:, None, None], 0, 255
    )
    assert np.abs(full[:256, :44, :3].astype(float) - expected.transpose(1, 2, 0)).max() <= 1
    assert (full[:, 44:, 3] == 0).all() and (full[:, :44, 3] == 255).all()


# --------------------------------------------------------------------------- CLI


def test_cli_refuses_a_missing_folder_a_non_crop_folder_and_a_port_in_use(folder, tmp_path):
    review, train = folder
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", str(tmp_path / "nope"), "--train-dir", str(train)])
    assert result.exit_code == 2 and "nope: no such folder" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(cli, ["serve", str(train), "--train-dir", str(tmp_path / "t2")])
    assert result.exit_code == 2 and "not a crop folder" in result.output
    busy = bind(0)
    try:
        port = busy.getsockname()[1]
        result = runner.invoke(
            cli, ["serve", str(review), "--train-dir", str(train), "--port", str(port)]
        )
        assert (
            result.exit_code == 2 and f"port {port}" in result.output and "in use" in result.output
        )
    finally:
        busy.close()
    assert not (review / JOURNAL).exists()
    with socket.socket() as probe:  # nothing was left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert json.loads(json.dumps(open_folder(review, train).describe()))["n_crops"] == 12


def test_a_tiff_chip_moves_with_its_preview_and_is_shown_by_it(tmp_path):
    rng = np.random.default_rng(1)
    chips = rng.integers(0, 4000, (3, 4, 8, 8), dtype=np.uint16)  # 4-band, 16-bit crops
    previews = rng.integers(0, 255, (3, 3, 8, 8), dtype=np.uint8)
    ids = np.arange(1, 4, dtype=np.uint32)
    table = pa.table({"segment_id": ids, "x": ids * 1.0, "y": ids * 2.0})
    rows = write_crops(
        tmp_path / "review", "r", table, chips, ["forest"] * 3, score=np.array([0.3, 0.2, 0.1]),
        margin=np.zeros(3), previews=previews,
    )  # fmt: skip
    write_crops_table(tmp_path / "review", rows, {})
    for name in CLASSES:
        (tmp_path / "train" / name).mkdir(parents=True)
    served = open_folder(tmp_path / "review", tmp_path / "train")
    sorter = Sorter(served.folder, served.queue, served.train_dir, served.classes)
    i = int(sorter.queue.pending(0, 1)[0])
    chip = os.path.basename(sorter.queue.file[i])
    assert chip.endswith(".tif")
    sorter.sort([i], "water")
    moved = tmp_path / "train" / "water"
    assert sorted(p.name for p in moved.iterdir()) == sorted([chip, chip[:-4] + ".png"])
    assert not any((tmp_path / "review").rglob(chip[:-4] + ".*"))
    assert sorter.undo() == [i]
    assert not any(moved.iterdir())
    assert len(list((tmp_path / "review").rglob(chip[:-4] + ".*"))) == 2
