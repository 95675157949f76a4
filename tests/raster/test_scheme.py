"""Class schemes: the user's codes, names and colors from input to every output."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from checkpoints import save_untrained_checkpoint
from click.testing import CliRunner
from rasters import texture_mosaic, write_raster

from superdml.cli.commands import cli
from superdml.config.schema import CropsConfig, LabelConfig, SegmentConfig
from superdml.core.errors import InputError
from superdml.crops.rule import read_crop_rule
from superdml.crops.stage import export_crops
from superdml.label.index import build_index
from superdml.label.stage import label
from superdml.raster.classes import (
    SCHEME_FILE,
    default_scheme,
    folder_scheme,
    make_scheme,
    palette,
    read_scheme,
    write_scheme,
)
from superdml.raster.label_rasters import read_label_scheme
from superdml.segment.stage import segment_raster

#: The land-cover scheme of the input map: codes, names and its color table.
CODES = {1: "ocean", 2: "land", 3: "lake"}
COLORS = {1: (0, 60, 200), 2: (30, 140, 40), 3: (150, 200, 255)}


def files_under(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A mosaic, its land-cover map (codes 1..3, color table) and crops cut from it."""
    root = tmp_path_factory.mktemp("scheme")
    rgb, truth = texture_mosaic(128)
    source = write_raster(root / "mosaic.tif", rgb)
    landcover = np.minimum(truth, 3).astype(np.uint8)
    cover = write_raster(root / "landcover.tif", landcover[None], nodata=0)
    with rasterio.open(cover, "r+") as dst:
        dst.write_colormap(1, {c: (*rgb_, 255) for c, rgb_ in COLORS.items()})
    classes = root / "classes.yaml"  # names only: the colors come from the color table
    classes.write_text("".join(f"{code}: {name}\n" for code, name in CODES.items()))
    seg = segment_raster(source, root / "seg", SegmentConfig(region_size=16, tile_size=64))
    crops = root / "crops"
    export_crops(
        seg.out_dir, crops, CropsConfig(crop_size=16, mask="none", per_class=6), cover, classes
    )
    return {"root": root, "seg": seg, "crops": crops, "cover": cover, "classes": classes}


def run_to_export(world, crops, name):
    """Untrained checkpoint (classes from the folders) -> index -> label -> export CLI."""
    root = world["root"]
    names = sorted(p.name for p in crops.iterdir() if p.is_dir())
    rule = read_crop_rule(world["crops"]).to_dict()
    ckpt = save_untrained_checkpoint(root / f"{name}.pt", names, crop_rule=rule)
    build_index(ckpt, crops, root / f"{name}-ref", device="cpu")
    out = root / f"{name}-out"
    label(world["seg"].out_dir, ckpt, root / f"{name}-ref", out, LabelConfig(k=3), device="cpu")
    result = CliRunner().invoke(cli, ["export", str(out), "--segments", str(world["seg"].out_dir)])
    assert result.exit_code == 0, result.output
    return out


def test_crops_write_the_scheme_of_the_label_raster(world):
    scheme = read_scheme(world["crops"] / SCHEME_FILE)
    assert {e.code: (e.name, e.color) for e in scheme.entries} == {
        c: (CODES[c], COLORS[c]) for c in CODES
    }
    assert (scheme.unknown, scheme.nodata) == (255, 0)


def test_label_raster_codes_and_colors_reach_every_output(world):
    import pyogrio

    out = run_to_export(world, world["crops"], "cover")
    with rasterio.open(out / "labels.tif") as src:
        labels = src.read(1)
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        assert {c: src.colormap(1)[c][:3] for c in CODES} == COLORS
        tags = src.tags(1)
    assert set(np.unique(labels).tolist()) == set(CODES)
    assert json.loads(tags["class_names"]) == {str(c): n for c, n in CODES.items()}
    assert tags["unknown_code"] == "255"
    # every labeled crop keeps its class (its own crop is its nearest reference), by code
    preds = pq.read_table(out / "predictions").to_pydict()
    by_segment = dict(zip(preds["segment_id"], preds["label_code"], strict=True))
    crops = pq.read_table(world["crops"] / "crops.parquet").to_pydict()
    code_of = {n: c for c, n in CODES.items()}
    assert len(crops["label"]) == 18
    for segment, name in zip(crops["segment_id"], crops["label"], strict=True):
        assert by_segment[segment] == code_of[name]
    assert all(code_of[n] == c for n, c in zip(preds["label"], preds["label_code"], strict=True))
    with rasterio.open(world["seg"].segments_path) as seg:
        segments = seg.read(1)
    np.testing.assert_array_equal(labels, np.vectorize(by_segment.get)(segments))
    style = (out / "labels.qml").read_text()
    for code, name in CODES.items():
        hexa = "#{:02x}{:02x}{:02x}".format(*COLORS[code])
        assert f'value="{code}" color="{hexa}" alpha="255" label="{name}"' in style
    _, _, _, fields = pyogrio.raw.read(out / "superpixels.gpkg", columns=["label", "label_code"])
    assert all(code_of[n] == c for n, c in zip(*fields, strict=True))
    summary = json.loads((out / "summary.json").read_text())
    assert {n: s["code"] for n, s in summary["classes"].items()} == code_of
    assert {c: s["name"] for c, s in summary["codes"].items()} == {
        str(c): n for c, n in CODES.items()
    }
    pixels = {c: int((labels == c).sum()) for c in CODES}
    assert {int(c): s["area_px"] for c, s in summary["codes"].items()} == pixels


def test_hand_made_folder_with_its_classes_yaml_exports_its_codes(world):
    hand = world["root"] / "hand"
    renamed = {"ocean": "sea", "land": "forest", "lake": "water"}
    for old, new in renamed.items():
        shutil.copytree(world["crops"] / old, hand / new)
    (hand / SCHEME_FILE).write_text(
        '111: water\n211: {name: forest, color: "#228b22"}\n'
        "512: {name: sea, description: Open sea}\n"
    )
    out = run_to_export(world, hand, "hand")
    with rasterio.open(out / "labels.tif") as src:
        labels = src.read(1)
        assert src.dtypes[0] == "uint16"
        assert src.colormap(1)[211][:3] == (0x22, 0x8B, 0x22)
        assert src.tags(1)["unknown_code"] == "65535"
    assert set(np.unique(labels).tolist()) == {111, 211, 512}
    preds = pq.read_table(out / "predictions")
    pairs = set(zip(preds["label"].to_pylist(), preds["label_code"].to_pylist(), strict=True))
    assert pairs == {("water", 111), ("forest", 211), ("sea", 512)}


def test_retraining_keeps_the_codes_of_the_classes_that_stayed(tmp_path):
    base = make_scheme({c: {"name": n} for c, n in CODES.items()}, "base")
    for name in ["land", "lake", "sand"]:
        (tmp_path / name).mkdir()
    scheme = folder_scheme(tmp_path, ["lake", "land", "sand"], base)
    assert scheme.codes == {"ocean": 1, "land": 2, "lake": 3, "sand": 4}
    assert [e.color for e in scheme.entries[:3]] == [e.color for e in base.entries]
    assert len({e.color for e in scheme.entries}) == 4
    assert default_scheme(["b", "a"]).codes == {"a": 1, "b": 2}


def test_scheme_file_round_trips(tmp_path):
    scheme = make_scheme(
        {7: {"name": "crop", "color": "#ffcc00", "description": 'with "quotes"'}, 9: {"name": "x"}},
        "test",
        unknown=8,
    )
    write_scheme(tmp_path / SCHEME_FILE, scheme)
    assert read_scheme(tmp_path / SCHEME_FILE) == scheme


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1: ocean\n1: sea\n", "code 1 is given twice (line 2): one name per code"),
        ("1: ocean\n300: land\n", "code 300 of 'land' is outside the label raster's values (uint8"),
        ('1: {name: ocean, color: "blue"}\n', "color 'blue' for code 1 is not a color"),
        ("1:\n  name: ocean\n  color: #0000ff\n", "color None for code 1 is not a color"),
        ("1: {name: ocean, color: 255}\n", "color 255 for code 1 is not a color"),
        ("1: ocean\n2: Ocean\n", "codes 1 and 2 have the same class name ('ocean', 'Ocean')"),
        ("1: ocean\nunknown: 1\n", "unknown code 1 is also the code of 'ocean'"),
        ("1: {name: ocean, colour: '#0000ff'}\n", "code 1: unknown key 'colour'"),
        ("-1: ocean\n", "code -1 is not an integer in 0..65535"),
    ],
)
def test_bad_scheme_for_crops_is_one_line_and_writes_nothing(world, tmp_path, text, message):
    classes = tmp_path / "classes.yaml"
    classes.write_text(text)
    args = ["crops", str(world["seg"].out_dir), "--out", str(tmp_path / "crops")]
    args += ["--label-raster", str(world["cover"]), "--classes", str(classes)]
    result = CliRunner().invoke(cli, args)
    one_line_error(result, f"error: {classes}: {message}")
    assert files_under(tmp_path) == ["classes.yaml"]


def index_cli(checkpoint, folder, out):
    args = ["index", "--checkpoint", str(checkpoint), "--reference-dir", str(folder)]
    return CliRunner().invoke(cli, [*args, "--out", str(out), "--device", "cpu"])


def test_class_folder_missing_from_the_scheme_is_refused(world, tmp_path):
    folder = tmp_path / "ref"
    shutil.copytree(world["crops"], folder)
    (folder / SCHEME_FILE).write_text("1: ocean\n2: land\n")
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", ["lake", "land", "ocean"])
    result = index_cli(ckpt, folder, tmp_path / "out")
    one_line_error(result, f"error: {folder / SCHEME_FILE}: class folder 'lake' is not in")
    assert not (tmp_path / "out").exists()


def test_code_that_changes_meaning_between_checkpoint_and_reference_is_refused(world, tmp_path):
    folder = tmp_path / "ref"
    shutil.copytree(world["crops"], folder)
    (folder / SCHEME_FILE).write_text("1: lake\n2: land\n3: ocean\n")
    scheme = read_scheme(world["crops"] / SCHEME_FILE)
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", scheme.names, class_scheme=scheme)
    result = index_cli(ckpt, folder, tmp_path / "out")
    one_line_error(
        result, f"error: {folder / SCHEME_FILE}: code 1 is 'lake' here but 'ocean' in checkpoint"
    )
    assert not (tmp_path / "out").exists()


def test_unrecorded_scheme_gets_sorted_codes_and_distinct_colors():
    scheme = default_scheme(["water", "forest", "city"])
    assert scheme.codes == {"city": 1, "forest": 2, "water": 3}
    assert len({e.color for e in scheme.entries}) == 3
    with pytest.raises(InputError, match="nodata code 0 is also the code of 'a'"):
        make_scheme({0: {"name": "a"}}, "test")


def test_palette_is_tab20_then_golden_angle_hues_without_the_avoided():
    from matplotlib import colormaps

    tab20 = [tuple(round(255 * c) for c in colormaps["tab20"](i)[:3]) for i in range(20)]
    assert palette(20) == tab20
    assert palette(3, avoid={tab20[0], tab20[2]}) == [tab20[1], tab20[3], tab20[4]]
    assert palette(21)[20] == (230, 80, 80)  # hue 0 at saturation 0.65, value 0.9


def test_gdal_category_names_of_the_label_raster_name_the_classes(world, tmp_path):
    cover = tmp_path / "cover.tif"
    shutil.copy(world["cover"], cover)
    categories = "".join(f"<Category>{n}</Category>" for n in ["", "sea", "", "pond"])
    (tmp_path / "cover.tif.aux.xml").write_text(
        f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{categories}</CategoryNames>'
        "</PAMRasterBand></PAMDataset>"
    )
    scheme = read_label_scheme(cover, None)
    assert {e.code: (e.name, e.color) for e in scheme.entries} == {
        1: ("sea", COLORS[1]),
        3: ("pond", COLORS[3]),
    }


def test_relabeling_after_the_codes_changed_writes_the_new_codes(world, tmp_path):
    folder = tmp_path / "ref"
    shutil.copytree(world["crops"], folder)
    rule = read_crop_rule(world["crops"]).to_dict()
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", ["lake", "land", "ocean"], crop_rule=rule)
    out, config = tmp_path / "out", LabelConfig(k=3)
    for codes in ({1: "ocean", 2: "land", 3: "lake"}, {10: "ocean", 20: "land", 30: "lake"}):
        (folder / SCHEME_FILE).write_text("".join(f"{c}: {n}\n" for c, n in codes.items()))
        build_index(ckpt, folder, tmp_path / "index", device="cpu")
        label(world["seg"].out_dir, ckpt, tmp_path / "index", out, config, device="cpu")
        preds = pq.read_table(out / "predictions")
        pairs = set(zip(preds["label_code"].to_pylist(), preds["label"].to_pylist(), strict=True))
        assert pairs == set(codes.items())
