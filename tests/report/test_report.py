"""mgral.report: metric definitions (known answers), loading errors, tables and plots from hand-written runs."""

from __future__ import annotations

import csv
import json
import math

import matplotlib
import numpy as np
import pytest

from mgral.errors import RunError
from mgral.report import (
    aggregate,
    labels_to_reach,
    load_reference,
    load_series,
    normalized_auc,
    plot_curves,
    results_table,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(cycle, num_labeled, mAP, *, label="random", seed=0, boxes=None, train=10.0):
    return {
        "strategy": label,
        "strategy_name": label.split("-")[0],
        "seed": seed,
        "cycle": cycle,
        "num_labeled": num_labeled,
        "num_boxes_labeled": boxes if boxes is not None else 4 * num_labeled,
        "labeling_cost": float(num_labeled),
        "mAP": mAP,
        "mAP50": min(1.0, 1.5 * mAP),
        "per_class": {"0": mAP},
        "selected": [],
        "seconds": {"train": train, "evaluate": 1.0, "predict": 2.0, "select": 0.5},
        "finished_at": "2026-11-24T20:40:00+00:00",
    }


def write_series(run, label, seed, maps, *, start=20, step=20, **kwargs):
    """``RUN/<label>/seed-<seed>/cycles.jsonl`` with one record per mAP, labels start, start+step, ..."""
    path = run / label / f"seed-{seed}" / "cycles.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [record(c, start + c * step, m, label=label, seed=seed, **kwargs) for c, m in enumerate(maps)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_reference(run, seed, mAP, num_labeled=500):
    path = run / "reference" / f"seed-{seed}" / "cycles.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record(0, num_labeled, mAP, label="full-data", seed=seed)}) + "\n")


@pytest.fixture
def run(tmp_path):
    """Two strategies × 3 seeds, 3 cycles at 20/40/60 images, and a full-data reference of 0.5."""
    run = tmp_path / "run"
    for seed, shift in enumerate([-0.01, 0.0, 0.01]):
        write_series(run, "random", seed, [0.1 + shift, 0.3 + shift, 0.4 + shift], train=10.0 + seed)
        write_series(run, "entropy-max", seed, [0.1 + shift, 0.35 + shift, 0.48 + shift])
    write_reference(run, 0, 0.5)
    return run


def read_csv(path):
    with open(path, newline="") as fh:
        return {row["label"]: row for row in csv.DictReader(fh)}


# -- metric definitions -------------------------------------------------------------------


def test_normalized_auc_is_the_mean_map_over_the_labeling_range():
    assert normalized_auc([10, 20, 30, 40, 50], [0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(0.4, abs=1e-12)
    assert normalized_auc([10, 50], [0.2, 0.6]) == pytest.approx(0.4, abs=1e-12)
    assert normalized_auc([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx(25 / 30)  # uneven steps weigh by width
    assert normalized_auc([100], [0.37]) == 0.37
    assert normalized_auc([5, 5], [0.2, 0.4]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="must not decrease"):
        normalized_auc([10, 5], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-D"):
        normalized_auc([], [])


def test_labels_to_reach_interpolates_between_cycles():
    x, y = [20, 40, 60], [0.1, 0.3, 0.5]
    assert labels_to_reach(x, y, 0.4) == pytest.approx(50.0)
    assert labels_to_reach(x, y, 0.3) == 40.0  # reached exactly at a cycle
    assert labels_to_reach(x, y, 0.05) == 20.0  # the initial model already reaches it
    assert labels_to_reach([20, 40, 60], [0.1, 0.5, 0.2], 0.2) == pytest.approx(25.0)  # the first crossing
    assert labels_to_reach(x, y, 0.51) is None


def test_aggregate_mean_and_sample_std_over_seeds(run):
    series = load_series([run])
    assert [(s.label, s.seed) for s in series] == [("entropy-max", s) for s in range(3)] + [
        ("random", s) for s in range(3)
    ]
    curves = aggregate(series, "num_labeled", "mAP")
    assert list(curves) == ["entropy-max", "random"]
    rnd = curves["random"]
    assert (rnd.seeds, rnd.cycles, rnd.max_cycles) == (3, 3, 3)
    np.testing.assert_allclose(rnd.x, [20, 40, 60])
    np.testing.assert_allclose(rnd.x_std, 0, atol=0)
    np.testing.assert_allclose(rnd.mean, [0.1, 0.3, 0.4])
    np.testing.assert_allclose(rnd.std, [0.01, 0.01, 0.01])  # ddof=1 of (-0.01, 0, 0.01)
    one = aggregate([s for s in series if s.seed == 0], "num_boxes_labeled", "mAP50")["random"]
    np.testing.assert_allclose(one.x, [80, 160, 240])
    np.testing.assert_array_equal(one.std, [0, 0, 0])


# -- loading ------------------------------------------------------------------------------


def test_a_directory_without_series_is_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"is not a run directory: expected <strategy label>/seed-<s>/cycles.jsonl"):
        load_series([tmp_path / "empty"])
    with pytest.raises(RunError, match="is not a directory"):
        load_series([tmp_path / "missing"])
    write_reference(tmp_path / "only-ref", 0, 0.5)  # a reference alone is no AL series
    with pytest.raises(RunError, match="is not a run directory"):
        load_series([tmp_path / "only-ref"])


def test_non_contiguous_cycles_name_the_file(tmp_path):
    path = write_series(tmp_path / "run", "random", 0, [0.1])
    with open(path, "a") as fh:
        fh.write(json.dumps(record(2, 60, 0.3)) + "\n")
    with pytest.raises(RunError) as info:
        load_series([tmp_path / "run"])
    assert str(path) in str(info.value)
    assert "cycles are [0, 2], expected 0..1 without gaps" in str(info.value)


def test_the_same_run_twice_is_refused(run):
    with pytest.raises(RunError, match="given twice"):
        load_series([run, run / ".." / "run"])


def test_series_with_one_label_pool_across_runs(tmp_path):
    write_series(tmp_path / "a", "random", 0, [0.1, 0.3])
    write_series(tmp_path / "b", "random", 0, [0.3, 0.5])
    write_reference(tmp_path / "b", 0, 0.6)
    series = load_series([tmp_path / "a", tmp_path / "b"])
    assert aggregate(series)["random"].seeds == 2
    np.testing.assert_allclose(aggregate(series)["random"].mean, [0.2, 0.4])
    assert load_reference([tmp_path / "a"]) is None
    assert load_reference([tmp_path / "a", tmp_path / "b"])[0]["mAP"] == 0.6


# -- tables -------------------------------------------------------------------------------


def test_results_csv_numbers(run, tmp_path):
    write_report([run], tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "results.csv")
    rnd, ent = rows["random"], rows["entropy-max"]
    assert (rnd["seeds"], rnd["cycles"], rnd["strategy_name"]) == ("3", "3", "random")
    assert float(rnd["c1_num_labeled"]) == 40.0
    assert float(rnd["c1_mAP_mean"]) == pytest.approx(0.3)
    assert float(rnd["c1_mAP_std"]) == pytest.approx(0.01)
    # the mean over seeds of normalized AUC: seed with shift s -> (0.1+0.3)/2/2 + (0.3+0.4)/2/2 + s = 0.275 + s
    assert float(rnd["nauc_mean"]) == pytest.approx(0.275)
    assert float(rnd["nauc_std"]) == pytest.approx(0.01)
    # 90% of 0.5 = 0.45: random never gets there; entropy crosses between 40 and 60 images
    assert rnd["labels_to_90pct"] == "" and rnd["labels_to_90pct_seeds"] == "0"
    per_seed = [40 + 20 * (0.45 - (0.35 + s)) / 0.13 for s in (-0.01, 0.0, 0.01)]
    assert float(ent["labels_to_90pct"]) == pytest.approx(np.mean(per_seed))
    assert ent["labels_to_90pct_seeds"] == "3"
    assert ent["labels_to_95pct_seeds"] == "2"  # 0.475: the seeds ending at 0.48 and 0.49
    per_seed = [40 + 20 * (0.475 - (0.35 + s)) / 0.13 for s in (0.0, 0.01)]
    assert float(ent["labels_to_95pct"]) == pytest.approx(np.mean(per_seed))
    assert float(rnd["seconds_train"]) == pytest.approx(11.0)
    assert float(rnd["seconds_select"]) == pytest.approx(0.5)


def test_results_markdown_is_a_pipe_table_with_a_header(run, tmp_path):
    text = write_report([run], tmp_path / "out").read_text()
    assert "Full-data reference: test mAP@[.5:.95] 0.5000" in text
    assert "nAUC: normalized area under the curve" in text
    text = text.split("## Batch diversity")[0]  # the results table; the diversity section follows it
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and len({line.count("|") for line in table}) == 1
    assert "| c0 (20 imgs) | c1 (40 imgs) | c2 (60 imgs) |" in table[0]
    assert set(table[1].strip("|").split("|")) <= {"---", "---:"}
    assert "| random | 3 | 0.1000 ± 0.0100 | 0.3000 ± 0.0100 |" in text
    assert "| — |" in table[3]  # random never reaches 90%
    assert " (2/3) |" in table[2]  # two entropy seeds reach 95%


def test_single_seed_single_cycle_without_reference(tmp_path):
    write_series(tmp_path / "run", "random", 0, [0.25])
    md = write_report([tmp_path / "run"], tmp_path / "out")
    row = read_csv(tmp_path / "out" / "results.csv")["random"]
    assert float(row["nauc_mean"]) == 0.25 and row["nauc_std"] == ""  # one seed: no spread
    assert row["labels_to_90pct"] == ""
    assert "Full-data reference: none" in md.read_text()
    assert "full data" not in (tmp_path / "out" / "curves_images.svg").read_text()


def test_a_run_in_progress_uses_the_seeds_that_got_furthest(tmp_path):
    run = tmp_path / "run"
    write_series(run, "random", 0, [0.1, 0.2, 0.3, 0.4])
    write_series(run, "random", 1, [0.1, 0.4])
    write_series(run, "random", 2, [0.1, 0.2, 0.5, 0.6])
    (run / "random" / "seed-3").mkdir()  # started, no cycle finished yet: not a series
    table = results_table(load_series([run]))
    (row,) = table.rows
    assert (row.seeds, row.cycles, row.max_cycles, row.planned_seeds) == (2, 4, 4, 3)  # seed 1 is behind
    np.testing.assert_allclose(row.map_mean, [0.1, 0.2, 0.4, 0.5])
    assert row.in_progress and row.progress() == "2 of 3 seeds"
    text = write_report([run], tmp_path / "out").read_text()
    assert "| random* | 2 |" in text and "random: 2 of 3 seeds" in text and "seeds that got furthest" in text
    assert "n=2" in (tmp_path / "out" / "curves_images.svg").read_text()


# -- plots --------------------------------------------------------------------------------


def test_report_writes_png_and_svg_curves(run, tmp_path):
    out = tmp_path / "out"
    assert write_report([run], out) == out / "results.md"
    for name in ("curves_images.png", "curves_boxes.png", "curves_images_mAP50.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    for name in ("curves_images.svg", "curves_boxes.svg"):
        svg = (out / name).read_text()
        assert "<svg" in svg[:1000] and svg.rstrip().endswith("</svg>")
    svg = (out / "curves_images.svg").read_text()
    assert "full data (0.500)" in svg and "labeled images" in svg and "test mAP@[.5:.95]" in svg
    assert "entropy-max (n=3)" in svg
    assert "labeled boxes" in (out / "curves_boxes.svg").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "curves_boxes.png",
        "curves_boxes.svg",
        "curves_images.png",
        "curves_images.svg",
        "curves_images_mAP50.png",
        "report.html",
        "results.csv",
        "results.md",
        "selections.csv",
    ]  # no temporary files left behind


def test_svg_bytes_are_reproducible_and_rcparams_untouched(run, tmp_path):
    salt = matplotlib.rcParams["svg.hashsalt"]
    series, reference = load_series([run]), load_reference([run])
    (first,) = plot_curves(series, tmp_path / "a", reference=reference, formats=("svg",))
    (second,) = plot_curves(series, tmp_path / "b", reference=reference, formats=("svg",))
    assert first.read_bytes() == second.read_bytes()
    assert matplotlib.rcParams["svg.hashsalt"] == salt


def test_plot_rejects_unknown_keys(run, tmp_path):
    with pytest.raises(ValueError, match="x_key must be one of"):
        plot_curves(load_series([run]), tmp_path, x_key="images")
    with pytest.raises(ValueError, match="no series"):
        plot_curves([], tmp_path)


def test_vs_random_pairs_seeds_and_their_common_cycles(run, tmp_path):
    write_report([run], tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "results.csv")
    # entropy minus random, per seed: (0.225 + 0.415) / 2 - 0.275 = 0.045 on every seed
    ent = rows["entropy-max"]
    assert float(ent["nauc_vs_random_mean"]) == pytest.approx(0.045)
    assert float(ent["nauc_vs_random_std"]) == pytest.approx(0.0, abs=1e-12)
    assert (ent["wins_vs_random"], ent["paired_seeds"]) == ("3", "3")
    assert rows["random"]["nauc_vs_random_mean"] == ""  # no pair with itself
    md = (tmp_path / "out" / "results.md").read_text()
    # the same difference on every seed: the interval is that value, and the sign test's p is 2 / 2^3
    assert "| +0.0450 ± 0.0000 [+0.0450, +0.0450] (3/3, p 0.25) |" in md
    assert (ent["distinguishable_from_random"], float(ent["sign_p_vs_random"])) == ("1", 0.25)


def test_vs_random_uses_only_common_seeds_and_cycles(tmp_path):
    from mgral.report.tables import paired_difference

    run = tmp_path / "run"
    write_series(run, "random", 0, [0.1, 0.2, 0.3])
    write_series(run, "random", 1, [0.1, 0.2])  # still running
    write_series(run, "mgral", 1, [0.1, 0.3, 0.9])
    write_series(run, "mgral", 2, [0.1, 0.4])  # no random series for seed 2
    series = load_series([run])
    group = [s for s in series if s.label == "mgral"]
    rnd = [s for s in series if s.label == "random"]
    v = paired_difference(group, rnd)
    # seed 1 only, on cycles 0-1: (0.1 + 0.3) / 2 - (0.1 + 0.2) / 2; one pair: no spread, no interval
    assert (v.mean, v.wins, v.n) == (pytest.approx(0.05), 1, 1) and math.isnan(v.std) and math.isnan(v.low)
    assert not v.distinguishable
    assert paired_difference([s for s in group if s.seed == 2], rnd) is None


def test_paired_intervals_over_eight_seeds_say_which_differences_are_real(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for seed in range(8):
        base = 0.2 + 0.05 * rng.random()  # seeds differ far more than the strategies do
        write_series(run, "random", seed, [base, base + 0.10, base + 0.20])
        write_series(run, "good", seed, [base, base + 0.12 + 0.002 * seed, base + 0.22], train=20.0)
        noise = 0.01 if seed % 2 else -0.01  # wins on half the seeds, by as much as it loses
        write_series(run, "coin", seed, [base, base + 0.10 + noise, base + 0.20])
    write_report([run], tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "results.csv")
    good, coin = rows["good"], rows["coin"]
    assert good["distinguishable_from_random"] == "1" and float(good["nauc_vs_random_low"]) > 0
    assert float(good["sign_p_vs_random"]) == pytest.approx(2 / 2**8)
    assert coin["distinguishable_from_random"] == "0"
    assert float(coin["nauc_vs_random_low"]) < 0 < float(coin["nauc_vs_random_high"])
    assert float(coin["sign_p_vs_random"]) == 1.0
    # vs best other: good's rival is the next best (coin and random tie on the mean; max keeps the first)
    assert coin["best_other"] == "good" and float(coin["nauc_vs_best_high"]) < 0 and coin["wins_vs_best"] == "0"
    assert good["best_other"] in ("coin", "random") and good["paired_seeds_vs_best"] == "8"
    # the cost column: select seconds (0.5) per training second
    assert float(good["select_per_train"]) == pytest.approx(0.5 / 20) and float(coin["select_per_train"]) == 0.05
    md = (tmp_path / "out" / "results.md").read_text()
    coin_line = next(ln for ln in md.splitlines() if ln.startswith("| coin |"))
    assert "not distinguishable" in coin_line and "| good: -" in coin_line
    assert "not distinguishable" not in next(ln for ln in md.splitlines() if ln.startswith("| good |"))


def test_curves_get_a_paired_difference_panel_when_random_is_there(tmp_path):
    from PIL import Image

    from mgral.report.metrics import paired_curves

    run = tmp_path / "run"
    for seed, base in enumerate([0.1, 0.2, 0.15]):
        write_series(run, "random", seed, [base, base + 0.1, base + 0.2])
        write_series(run, "entropy", seed, [base, base + 0.1 + 0.01 * (seed + 1), base + 0.25])
    write_series(run, "margin", 9, [0.1, 0.2])  # no random series on its seed: no paired curve
    series = load_series([run])
    paired = paired_curves(series, "random")
    assert list(paired) == ["entropy"] and paired["entropy"].seeds == 3
    np.testing.assert_allclose(paired["entropy"].mean, [0.0, 0.02, 0.05])
    np.testing.assert_allclose(paired["entropy"].x, [20, 40, 60])
    # differences 0.01, 0.02, 0.03: the t interval over 3 seeds is wider than their range
    assert paired["entropy"].low[1] == pytest.approx(0.02 - 4.3027 * 0.01 / 3**0.5, abs=1e-4)
    assert paired["entropy"].high[1] == pytest.approx(0.02 + 4.3027 * 0.01 / 3**0.5, abs=1e-4)
    assert paired["entropy"].low[0] == paired["entropy"].high[0] == 0.0  # cycle 0: the same model
    tall = plot_curves(series, tmp_path / "a", formats=("png",))[0]
    flat = plot_curves([s for s in series if s.label != "random"], tmp_path / "b", formats=("png",))[0]
    boxes = plot_curves(series, tmp_path / "c", x_key="num_boxes_labeled", formats=("png",))[0]
    with Image.open(tall) as a, Image.open(flat) as b, Image.open(boxes) as c:
        assert a.height > 1.5 * b.height and c.height == b.height  # the panel: against images, beside random


def test_selections_csv_lists_every_chosen_image_in_order(tmp_path):
    run = tmp_path / "run"
    path = write_series(run, "entropy", 3, [0.1, 0.2, 0.3])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0].update(selected=[7, "b"], scores=[0.9, 0.5])
    records[1].update(selected=[2], scores=[0.4])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report([run], tmp_path / "out")
    with open(tmp_path / "out" / "selections.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["seed"], r["cycle"], r["rank"], r["image_id"], r["score"]) for r in rows] == [
        ("3", "0", "0", "7", "0.9"),
        ("3", "0", "1", "b", "0.5"),
        ("3", "1", "0", "2", "0.4"),
    ]
    assert {r["strategy"] for r in rows} == {"entropy"} and {r["file_name"] for r in rows} == {""}  # no dataset


def test_a_series_short_of_the_planned_cycles_is_in_progress(tmp_path):
    run = tmp_path / "run"
    write_series(run, "mgral", 0, [0.1, 0.2])  # every seed at cycle 1 of the 6 the config plans
    (run / "config.yaml").write_text("name: x\ncycles: 5\nseeds: [0, 1]\n")
    for seed in (0, 1):
        write_series(run, "random", seed, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    write_series(run, "cald", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # seed 1 not started
    rows = {r.label: r for r in results_table(load_series([run])).rows}
    assert (rows["mgral"].cycles, rows["mgral"].max_cycles, rows["mgral"].in_progress) == (2, 6, True)
    assert (rows["random"].cycles, rows["random"].max_cycles, rows["random"].in_progress) == (6, 6, False)
    assert (rows["cald"].seeds, rows["cald"].planned_seeds, rows["cald"].in_progress) == (1, 2, True)
    text = write_report([run], tmp_path / "out").read_text()
    assert "| mgral* | 1 |" in text and "| cald* | 1 |" in text and "| random | 2 |" in text
    assert "cald: 1 of 2 seeds; mgral: 2 of 6 cycles, 1 of 2 seeds" in text
    assert read_csv(tmp_path / "out" / "results.csv")["random"]["in_progress"] == "0"


def test_one_seed_shows_the_value_alone_and_several_keep_mean_and_std(tmp_path):
    """With one seed (or one seed paired with random) there is no spread: no fake "± 0.0000"."""
    run = tmp_path / "run"
    write_series(run, "random", 0, [0.1, 0.3])
    write_series(run, "entropy", 0, [0.1, 0.35])
    write_series(run, "entropy", 1, [0.12, 0.37])  # no random seed 1: one pair
    md = write_report([run], tmp_path / "out").read_text()
    assert "± 0.0000" not in md
    assert "| random | 1 | 0.1000 | 0.3000 | 0.2000 | — |" in md
    assert "| entropy | 2 | 0.1100 ± 0.0141 | 0.3600 ± 0.0141 | 0.2350 ± 0.0141 | +0.0250 (1/1) |" in md
    assert "the mean alone with 1 seed" in md
    rows = read_csv(tmp_path / "out" / "results.csv")
    rnd, ent = rows["random"], rows["entropy"]
    assert (rnd["c0_mAP_std"], rnd["c1_mAP_std"], rnd["nauc_std"]) == ("", "", "")  # missing, not 0
    assert float(rnd["c1_mAP_mean"]) == 0.3 and float(rnd["nauc_mean"]) == pytest.approx(0.2)
    assert float(ent["c0_mAP_std"]) == pytest.approx(0.0141421, abs=1e-6) and float(ent["nauc_std"]) > 0
    assert float(ent["nauc_vs_random_mean"]) == pytest.approx(0.025) and ent["nauc_vs_random_std"] == ""
    assert (ent["wins_vs_random"], ent["paired_seeds"]) == ("1", "1")
