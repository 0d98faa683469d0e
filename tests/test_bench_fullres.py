"""`make bench --resolution full`: the synthesised images follow the rule, are made once and never reused half
made, full-size data is used as given, and the limit rows' arithmetic and rule hold.

Fake Flowers-102 and the tiny backbones (plus a random-init ResNet-18 at the tiny config's 32 px); no
timing is asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy
import pytest
from helpers import make_tiny_config, write_fake_flowers
from test_bench import study_arguments

from pipeline.bench import fullres, limit, main, options, runner
from pipeline.bench.report import format_table
from pipeline.bench.subsets import proportional_counts
from pipeline.data import load_index
from pipeline.graph import Graph
from pipeline.runtime import plan_runtime

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT_ONLY = options.BenchOptions(images=24, rounds=3, rows=("limit",), resolution="full")


def study_index(config):
    graph = Graph(config, log=lambda line: None)
    download = graph.units("download")[0]
    graph.ensure(download)
    return load_index(graph.directory(download)), download.key


def image_sizes(folder: Path, ids) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for image_id in ids:
        with Image.open(Path(folder) / "jpg" / f"image_{int(image_id):05d}.jpg") as image:
            sizes.append(image.size)
    return sizes


@pytest.mark.parametrize("source", [(64, 64), (80, 60), (60, 80), (1000, 999)])
def test_synthesised_sizes_follow_the_rule_and_the_source_orientation(source):
    sizes = [fullres.synthesised_size(image_id, source) for image_id in range(1, 201)]
    assert sizes == [fullres.synthesised_size(image_id, source) for image_id in range(1, 201)]  # seeded
    assert all(min(size) == 500 and 500 <= max(size) <= 750 for size in sizes)
    longer = [max(size) for size in sizes]
    assert min(longer) < 560 and max(longer) > 690  # drawn over the whole range, not one value
    landscape = [width > height for width, height in sizes if width != height]
    if source[0] == source[1]:
        assert 0.3 < numpy.mean(landscape) < 0.7  # a square source: either way, seeded
    else:
        assert set(landscape) == {source[0] > source[1]}


def test_synthesis_is_deterministic_weighs_like_the_originals_and_is_made_once(tiny_config, tmp_path):
    index, key = study_index(tiny_config)
    made = fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path / "cache", log=lambda line: None)
    wanted = fullres.needed_ids(index, LIMIT_ONLY)
    count = sum(proportional_counts(index, 8).values())  # the limit rows' subset: --images / --rounds
    assert made.source == "synthesised" and made.synthesised == made.images == sum(map(len, wanted.values())) == count
    folder = Path(made.folder)
    assert folder.parent == tmp_path / "cache" / "bench" and folder.name.startswith(fullres.PREFIX)
    assert made.index.folder == folder and made.index.image_ids["test"].tolist() == index.image_ids["test"].tolist()
    ids = numpy.concatenate(list(wanted.values()))
    assert all(min(size) == 500 and 500 <= max(size) <= 750 for size in image_sizes(folder, ids))
    assert made.shorter_sides == (500, 500) and 10 < made.mean_kib < 120
    # The rows read the synthesised files through the index: each split's subset lies in the folder.
    assert all(str(path).startswith(str(folder)) for path in made.index.paths("train"))
    files = {path.name: path.read_bytes() for path in (folder / "jpg").iterdir()}
    again = fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path / "cache", log=lambda line: None)
    assert again.synthesised == 0 and again.folder == made.folder
    assert {path.name: path.read_bytes() for path in (folder / "jpg").iterdir()} == files
    # Another cache makes the same bytes; another source (key) gets another folder.
    elsewhere = fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path / "other", log=lambda line: None)
    assert {path.name: path.read_bytes() for path in (Path(elsewhere.folder) / "jpg").iterdir()} == files
    moved = fullres.full_resolution_index(index, key + "x", LIMIT_ONLY, tmp_path / "cache", log=lambda line: None)
    assert moved.folder != made.folder and moved.synthesised == count


def test_an_interrupted_synthesis_leaves_only_listed_whole_images_and_the_rest_is_made_again(
    tiny_config, tmp_path, monkeypatch
):
    index, key = study_index(tiny_config)
    real, wanted = fullres.synthesise, sorted(numpy.concatenate(list(fullres.needed_ids(index, LIMIT_ONLY).values())))

    def interrupted(source, image_id):
        if image_id == wanted[4]:  # in the third chunk of two
            raise KeyboardInterrupt
        return real(source, image_id)

    monkeypatch.setattr(fullres, "CHUNK", 2)
    monkeypatch.setattr(fullres, "synthesise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path, log=lambda line: None)
    folder = next((tmp_path / "bench").glob(f"{fullres.PREFIX}*"))
    listed = fullres.read_manifest(folder)
    assert len(listed) == 4  # two whole chunks committed; the third never was
    # A listed file that changed on disk is not reused either.
    victim = folder / "jpg" / f"image_{min(listed):05d}.jpg"
    victim.write_bytes(victim.read_bytes()[:100])
    monkeypatch.setattr(fullres, "synthesise", real)
    resumed = fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path, log=lambda line: None)
    assert resumed.synthesised == len(wanted) - 3 and len(fullres.read_manifest(folder)) == len(wanted)
    fresh = fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path / "fresh", log=lambda line: None)
    for name in (path.name for path in (folder / "jpg").glob("image_*.jpg")):
        assert (folder / "jpg" / name).read_bytes() == (Path(fresh.folder) / "jpg" / name).read_bytes()
    assert not list((folder / "jpg").glob(".*tmp*")), "no temporary file is left behind"


def test_full_size_data_is_used_as_given(tmp_path):
    data = write_fake_flowers(tmp_path / "data", pixels=420)
    config = make_tiny_config(data, tmp_path / "cache")
    index, key = study_index(config)
    lines = []
    given = fullres.full_resolution_index(index, key, LIMIT_ONLY, tmp_path / "cache", log=lines.append)
    assert given.source == "given" and given.index is index and given.synthesised == 0
    assert given.shorter_sides == (420, 420) and "used as given" in lines[-1]
    assert not (tmp_path / "cache" / "bench").exists()


def test_only_the_images_the_rows_read_are_synthesised_unless_all_are_asked(tiny_config):
    index, _ = study_index(tiny_config)
    sizes = {split: len(ids) for split, ids in index.image_ids.items()}
    count = lambda wanted: sum(map(len, wanted.values()))  # noqa: E731
    assert count(fullres.needed_ids(index, LIMIT_ONLY)) == sum(proportional_counts(index, 8).values())
    memory = options.BenchOptions(memory_images=24, rows=("memory",), resolution="full")
    assert 24 <= count(fullres.needed_ids(index, memory)) <= 24 + 12
    frozen = options.BenchOptions(test_images=6, rows=("frozen",), resolution="full")
    assert {split: len(ids) for split, ids in fullres.needed_ids(index, frozen).items()} == {**sizes, "test": 6}
    finetune = options.BenchOptions(rows=("finetune",), resolution="full")
    assert {split: len(ids) for split, ids in fullres.needed_ids(index, finetune).items()} == {
        "train": sizes["train"],
        "val": 0,
        "test": 0,
    }
    every = options.BenchOptions(rows=("limit",), resolution="full", synthesise_all=True)
    assert count(fullres.needed_ids(index, every)) == sum(sizes.values())


def test_the_limit_is_one_over_the_decode_and_model_seconds_per_image():
    assert limit.decode_model_limit(100.0, 100.0) == pytest.approx(50.0)
    assert limit.decode_model_limit(1000.0, 250.0) == pytest.approx(200.0)  # 1 ms + 4 ms per image
    assert limit.decode_share(1000.0, 250.0) == pytest.approx(0.2)


@pytest.mark.parametrize("ratios, met", [([0.9, 0.8, 0.86], True), ([0.84, 0.9, 0.8], False), ([0.85] * 3, True)])
def test_limit_row_is_the_median_round_ratio_against_its_target(tiny_config, ratios, met):
    runtime = plan_runtime(tiny_config.runtime)
    passes = [(400.0, 100.0), (200.0, 200.0), (1000.0, 250.0), (500.0, 500.0)]
    rates = [70.0, 80.0, 90.0]
    row = limit._row("x", "tiny-resnet", 32, runtime, passes, rates, ratios, 30, 10, LIMIT_ONLY)
    assert row["ratio"] == pytest.approx(float(numpy.median(ratios))) and row["met"] is met
    assert row["target"] == ">= 0.85" and row["ours"] == 80.0
    assert row["baseline"] == pytest.approx(float(numpy.median([80.0, 100.0, 200.0, 250.0])))
    assert row["t_decode_ms"] == pytest.approx(1000 / 450.0) and row["t_model_ms"] == pytest.approx(1000 / 225.0)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_full_resolution_run_measures_the_limit_decode_and_memory_rows_on_synthesised_images(tiny_config):
    knobs = options.BenchOptions(
        images=24, rounds=3, memory_images=24, resolution="full", rows=options.DEFAULT_ROWS["full"]
    )
    result = runner.run(tiny_config, knobs, study_arguments(tiny_config), log=lambda line: None)
    resolution = result["resolution"]
    assert resolution["mode"] == "full" and resolution["source"] == "synthesised" and resolution["synthesised"] > 7
    sections = [row["section"] for row in result["rows"]]
    assert sections == ["limit"] * 3 + ["decode"] * 6 + ["memory"] * 2
    assert all(row["what"].endswith("[full resolution]") for row in result["rows"])
    limits = [row for row in result["rows"] if row["section"] == "limit"]
    assert [row["backbone"] for row in limits] == ["tiny-resnet", "tiny-efficientnet", "resnet18"]
    assert "resnet18 (random weights)" in limits[-1]["what"]
    for row in limits:
        assert len(row["round_ratios"]) == 3 and row["met"] == (row["ratio"] >= 0.85)
        assert math.isclose(row["ratio"], float(numpy.median(row["round_ratios"])))
        assert row["baseline"] < min(row["decode_rate"], row["model_rate"])
    decode = [row for row in result["rows"] if row["section"] == "decode"]
    assert decode[0]["max_difference"] == 0 and decode[0]["ratio"] == pytest.approx(1.0)
    assert all(row["ours"] > 0 and row["met"] is None for row in decode)
    table = format_table(result)
    assert "Full resolution: " in table and json.loads(Path(result["path"]).read_text())["resolution"] == resolution


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "half"], "argument --resolution: invalid choice: 'half'"),
        (["--synthesise-all"], "--synthesise-all applies only with --resolution full"),
    ],
)
def test_bad_resolution_flags_give_one_line_errors(flags, message, capsys, tiny_config):
    code = main(study_arguments(tiny_config) + flags)
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and message in error and error.count("\n") == 1
