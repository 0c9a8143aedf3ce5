"""report.html and MGRAL's diagnostics: what the page holds, read back with an HTML parser,
from hand-written run directories (curves, a tiny COCO dataset, cached predictions and
MGRAL diagnostic files in the layout ``RUN/<label>/seed-<s>/cycle-<c>/mgral/``)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mgral.config import config_from_dict
from mgral.data import coco
from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.detectors.cache import save_predictions
from mgral.loop import run_experiment
from mgral.report import load_mgral_diagnostics, load_series, plot_mgral_diagnostics, render_html, write_report
from mgral.runs import reward_trend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = '<script>alert("x")</script>'
"""A category name that must come out as text, never as markup."""
GREY = (128, 128, 128)
IMAGE_SIZE = (320, 240)
CATEGORIES = [Category(1, "cat"), Category(2, EVIL)]


# -- fixtures: a run directory as mgral run and MGRAL write it -----------------------------


def record(label, seed, cycle, num_labeled, mAP, selected):
    return {
        "strategy": label,
        "strategy_name": label.split("-")[0],
        "seed": seed,
        "cycle": cycle,
        "num_labeled": num_labeled,
        "num_boxes_labeled": 3 * num_labeled,
        "labeling_cost": float(num_labeled),
        "mAP": mAP,
        "mAP50": min(1.0, 1.5 * mAP),
        "per_class": {"1": mAP},
        "selected": selected,
        "scores": [1.0] * len(selected),
        "seconds": {"train": 10.0 + seed, "evaluate": 1.0, "predict": 2.0, "select": 0.5, "label": 0.25},
        "finished_at": "2026-11-24T20:40:00+00:00",
    }


def write_series(run, label, seed, maps, selections):
    """``cycles.jsonl`` of one series: cycle c has mAP ``maps[c]`` and selected ``selections[c]``."""
    path = run / label / f"seed-{seed}" / "cycles.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [record(label, seed, c, 20 + 20 * c, m, list(selections[c])) for c, m in enumerate(maps)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path.parent


def write_dataset(root: Path, n: int = 12) -> Path:
    """A COCO dataset of ``n`` plain grey 320x240 PNGs (ids 1..n) under ``root``."""
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(1, n + 1):
        Image.new("RGB", IMAGE_SIZE, GREY).save(root / "images" / f"{i}.png")
        target = Target(boxes=[[10, 10, 50, 50]], labels=[1])
        records.append(ImageRecord(i, f"images/{i}.png", *IMAGE_SIZE, "train", target))
    coco.write_json(Dataset(root, CATEGORIES, records), root / "annotations.json")
    return root


def write_config(run: Path, dataset: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    config = {"name": "html-test", "dataset": {"path": str(dataset), "format": "coco", "image_root": None}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def write_mgral(cycle_dir: Path, *, loo: float | None, rewards: list[float]) -> Path:
    """MGRAL's three diagnostic files for one cycle, exactly in the agreed layout."""
    d = cycle_dir / "mgral"
    d.mkdir(parents=True, exist_ok=True)
    summary = {
        "loo_spearman": loo,
        "table_rows": 3,
        "seconds": {"features": 1.5, "table": 20.0, "reward_model": 0.75, "agent": 4.0, "selection": 0.125},
        "diversity": {"mean_pairwise_distance": 0.4321, "class_histogram": {"cat": 3, EVIL: 1}},
        "reward": {"first": rewards[0], "last": rewards[-1]},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    lines = ["update,reward_mean,reward_max,baseline,entropy"]
    lines += [f"{k},{r},{r + 0.1},{r / 2},{1.0 - 0.1 * k}" for k, r in enumerate(rewards)]
    (d / "agent_rewards.csv").write_text("\n".join(lines) + "\n")
    cycle = int(cycle_dir.name.removeprefix("cycle-"))
    table = [
        ["cycle", "combination", "dmAP", "mAP", "AP[cat]", f"AP[{EVIL}]"],
        [cycle, "control", 0.0, 0.3, 0.35, 0.25],
        [cycle, json.dumps([3, 4]), 0.02, 0.32, 0.37, 0.27],
        [cycle, json.dumps([5, "<b>odd id</b>"]), -0.01, 0.29, 0.3, 0.28],
    ]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    (d / "table.csv").write_text(buffer.getvalue())
    return d


def make_run(tmp_path: Path, *, with_dataset: bool = True) -> Path:
    """Strategies random (2 seeds, no predictions cached), entropy-max (2 seeds, predictions
    cached for seed 0) and mgral (1 seed, diagnostics in cycles 0 and 1); 3 cycles each,
    2 images selected per cycle (8 by random's seed 0 in cycle 0)."""
    run = tmp_path / "run"
    write_config(run, write_dataset(tmp_path / "data") if with_dataset else tmp_path / "missing-data")
    for seed, shift in enumerate([-0.01, 0.01]):
        write_series(run, "random", seed, [0.1 + shift, 0.3 + shift, 0.4 + shift], [range(1, 9), [9, 10], []])
        series = write_series(run, "entropy-max", seed, [0.1 + shift, 0.35, 0.45], [[1, 2], [3, 4], []])
        if seed == 0:
            for cycle, ids in enumerate([[1, 2], [3, 4]]):
                preds = {
                    i: Detections(boxes=[[40, 40, 200, 160], [0, 0, 30, 30]], scores=[0.9, 0.1], labels=[2, 1])
                    for i in ids
                }
                preds[11] = Detections()  # a pool image not selected
                save_predictions(series / f"cycle-{cycle}" / "predictions.npz", preds)
    series = write_series(run, "mgral", 0, [0.12, 0.33, 0.47], [[5, 6], [7, 8], []])
    write_mgral(series / "cycle-0", loo=0.512, rewards=[0.01, 0.02, 0.05])
    write_mgral(series / "cycle-1", loo=None, rewards=[0.03, 0.04])
    return run


# -- reading the page back -----------------------------------------------------------------


class Page(HTMLParser):
    """The parts of the page the tests read: tables (by class) as rows of cell texts, images,
    every src/href, the text, and whether any script or external reference is there."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.ids: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.append(a["id"])
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = (a.get("class") or "").split()[0]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def body_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def decode(uri: str) -> bytes:
    head, data = uri.split(",", 1)
    assert head.endswith(";base64")
    return base64.b64decode(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of :func:`make_run`, written once for the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("report")
    out = tmp_path / "out"
    write_report([make_run(tmp_path)], out)
    text = (out / "report.html").read_text(encoding="utf-8")
    return out, text, Page(text)


# -- loading MGRAL's diagnostics -----------------------------------------------------------


def test_load_mgral_diagnostics_reads_every_file(tmp_path):
    run = make_run(tmp_path)
    diagnostics = load_mgral_diagnostics(run)
    assert [(d.label, d.seed, d.cycle) for d in diagnostics] == [("mgral", 0, 0), ("mgral", 0, 1)]
    first, second = diagnostics
    assert first.problems == [] and first.run_dir == run
    assert first.loo_spearman == 0.512 and second.loo_spearman is None  # null: not computed that cycle
    assert first.table_rows == 3
    assert first.seconds == {"features": 1.5, "table": 20.0, "reward_model": 0.75, "agent": 4.0, "selection": 0.125}
    assert first.mean_pairwise_distance == 0.4321
    assert first.class_histogram == {"cat": 3, EVIL: 1}
    assert (first.reward_first, first.reward_last) == (0.01, 0.05)
    assert sorted(first.agent) == ["baseline", "entropy", "reward_max", "reward_mean", "update"]
    np.testing.assert_allclose(first.agent["reward_mean"], [0.01, 0.02, 0.05])
    np.testing.assert_allclose(first.agent["update"], [0, 1, 2])
    assert first.categories == ["cat", EVIL]
    control, good, odd = first.table
    assert control.control and control.combination == [] and control.dmAP == 0.0 and control.cycle == 0
    assert good.combination == [3, 4] and good.dmAP == 0.02 and good.ap == {"cat": 0.37, EVIL: 0.27}
    assert odd.combination == [5, "<b>odd id</b>"] and not odd.control
    assert load_mgral_diagnostics([run]) and load_mgral_diagnostics(str(run))  # one path or several


def test_load_mgral_diagnostics_tolerates_absent_and_broken_files(tmp_path, caplog):
    run = make_run(tmp_path)
    d = run / "mgral" / "seed-0" / "cycle-1" / "mgral"
    (d / "summary.json").write_text("{not json")
    (d / "table.csv").unlink()
    only_agent = run / "mgral" / "seed-0" / "cycle-2" / "mgral"
    only_agent.mkdir(parents=True)
    (only_agent / "agent_rewards.csv").write_text("update,reward_mean\n0,0.5\n1,\n")  # older columns, a gap
    (run / "random" / "seed-0" / "cycle-1" / "mgral").mkdir(parents=True)  # an empty directory is no data
    diagnostics = load_mgral_diagnostics(run)
    assert [d.cycle for d in diagnostics] == [0, 1, 2]
    broken, partial = diagnostics[1], diagnostics[2]
    assert len(broken.problems) == 1 and broken.problems[0].startswith("summary.json: unreadable")
    assert broken.loo_spearman is None and broken.table == [] and len(broken.agent["reward_mean"]) == 2
    assert "cannot read MGRAL diagnostics" in caplog.text
    assert partial.problems == [] and partial.loo_spearman is None and partial.table == []
    np.testing.assert_array_equal(partial.agent["reward_mean"], [0.5, np.nan])
    assert sorted(partial.agent) == ["reward_mean", "update"]
    write_report([run], tmp_path / "out")  # and the report is still written, naming the problem
    assert "summary.json: unreadable" in (tmp_path / "out" / "report.html").read_text()
    assert load_mgral_diagnostics(tmp_path / "nothing-here") == []


def test_plot_mgral_diagnostics_writes_png_and_svg(tmp_path):
    diagnostics = load_mgral_diagnostics(make_run(tmp_path))
    png, svg = plot_mgral_diagnostics(diagnostics, tmp_path / "out")
    assert png.name == "mgral_diagnostics.png" and png.read_bytes().startswith(PNG_SIGNATURE)
    text = svg.read_text()
    assert "mgral seed 0: agent reward" in text and "LOO Spearman" in text and "cycle 1" in text
    with pytest.raises(ValueError, match="no MGRAL diagnostics"):
        plot_mgral_diagnostics([], tmp_path)


# -- the page ------------------------------------------------------------------------------


def test_report_writes_report_html_and_the_diagnostics_png(report):
    out, text, page = report
    assert sorted(p.name for p in out.iterdir()) == [
        "curves_boxes.png",
        "curves_boxes.svg",
        "curves_images.png",
        "curves_images.svg",
        "curves_images_mAP50.png",
        "mgral_diagnostics.png",
        "mgral_diagnostics.svg",
        "report.html",
        "results.csv",
        "results.md",
        "selections.csv",
    ]
    png = (out / "mgral_diagnostics.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert {"curves", "results", "timings", "mgral", "gallery"} <= set(page.ids)


def test_report_html_is_self_contained(report):
    out, text, page = report
    assert "script" not in page.tags
    assert all(u.startswith("data:") or u.startswith("#") for u in page.urls), [u[:60] for u in page.urls]
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:' in text
    # the curves are the very files written beside the page
    figures = [i for i in page.images if i.get("alt", "").startswith("test mAP")]
    assert [decode(i["src"]) for i in figures] == [
        (out / name).read_bytes() for name in ("curves_images.svg", "curves_boxes.svg", "curves_images_mAP50.png")
    ]
    assert figures[0]["width"] == "672" and figures[2]["width"] == "672"  # 504 pt SVG and 150-dpi PNG alike
    assert len(text) < 2_000_000


def test_report_html_results_and_timings(report):
    _, _, page = report
    head, *rows = page.tables["results"]
    assert head[:5] == ["strategy", "seeds", "c0 (20 imgs)", "c1 (40 imgs)", "c2 (60 imgs)"]
    assert head[5:] == ["nAUC", "vs random", "imgs to 90%", "imgs to 95%"]
    by_label = {r[0]: r for r in rows}
    assert list(by_label) == ["entropy-max (entropy)", "mgral", "random"]
    assert by_label["random"][1:5] == ["2", "0.1000 ± 0.0141", "0.3000 ± 0.0141", "0.4000 ± 0.0141"]
    assert by_label["random"][5] == "0.2750 ± 0.0141"
    assert by_label["random"][6:] == ["—", "—", "—"]  # no pair with itself, no full-data reference
    # mgral has seed 0 only: its values alone, no fake "± 0.0000"; one pair with random
    assert by_label["mgral"][1:7] == ["1", "0.1200", "0.3300", "0.4700", "0.3125", "+0.0475 (1/1)"]
    head, *rows = page.tables["timings"]
    assert head == ["strategy", "train", "evaluate", "predict", "select", "label", "total"]
    assert dict((r[0], r[1:]) for r in rows)["random"] == ["10.50", "1.00", "2.00", "0.50", "0.25", "14.25"]


def test_report_html_mgral_section_and_escaping(report):
    _, text, page = report
    head, *rows = page.tables["mgral-summary"]
    assert head[:7] == [
        "cycle",
        "LOO Spearman",
        "table rows",
        "agent updates",
        "mean reward, first 10 → last 10 updates",
        "mean pairwise distance",
        "class histogram",
    ]
    assert head[7:] == ["features s", "table s", "reward_model s", "agent s", "selection s"]
    assert rows[0][:7] == ["0", "0.512", "3", "3", "0.0100 → 0.0500", "0.4321", f"cat: 3, {EVIL}: 1"]
    assert rows[0][7:] == ["1.50", "20.00", "0.75", "4.00", "0.12"]
    assert rows[1][1] == "—"  # no LOO Spearman that cycle
    head, *rows = page.tables["mgral-table"]
    assert head == ["combination (image ids)", "dmAP", "mAP", "AP cat", f"AP {EVIL}"]
    assert [r[:2] for r in rows] == [["control", "+0.0000"], ["3, 4", "+0.0200"], ["5, <b>odd id</b>", "-0.0100"]]
    diagnostics = [i for i in page.images if i.get("alt") == "MGRAL diagnostics"]
    assert len(diagnostics) == 1 and decode(diagnostics[0]["src"]).startswith(b"<?xml")
    # user text is escaped: no markup from a category name or an image id reaches the page
    assert EVIL not in text and "<b>odd id</b>" not in text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text


def test_gallery_draws_predicted_boxes_and_says_when_none_are_cached(report):
    _, text, page = report
    thumbs = [i for i in page.images if i.get("alt", "").startswith("image ")]
    # 6 of random's 8 in cycle 0, then 2 per selecting cycle: random, entropy-max, mgral (seed 0 each)
    assert len(thumbs) == 6 + 2 + 2 + 2 + 2 + 2
    assert [t["alt"] for t in thumbs[:4]] == ["image 1", "image 2", "image 3", "image 4"]  # entropy-max first
    pixels = []
    for thumb in thumbs:
        with Image.open(io.BytesIO(decode(thumb["src"]))) as image:
            assert image.format == "JPEG" and image.size == (160, 120)
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    # entropy-max's 4 images carry boxes; the others (no predictions cached) are plain grey
    assert [bool(abs(p - GREY).max() > 60) for p in pixels] == [True] * 4 + [False] * 12
    # the 0.9 box (40..200 x 40..160 of 320x240) is drawn at half scale in the second category's colour
    boxed = pixels[0]
    assert abs(boxed[20, 60] - (255, 127, 14)).max() < 60 and abs(boxed[60, 60] - GREY).max() < 20
    assert text.count("no predictions cached") == 4  # random cycles 0, 1 and mgral 0, 1
    assert "1 box ≥ 0.3" in page.body_text()
    assert "8 images selected, the first 6 shown" in page.body_text()
    assert f"{EVIL} 0.90" not in text and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; 0.90" in text  # tooltip


def test_gallery_without_the_dataset_says_so_and_the_report_is_written(tmp_path):
    run = make_run(tmp_path, with_dataset=False)
    write_report([run], tmp_path / "out")
    page = Page((tmp_path / "out" / "report.html").read_text())
    assert "the run's dataset cannot be read, so there are no thumbnails" in page.body_text()
    assert not [i for i in page.images if i.get("alt", "").startswith("image ")]
    (run / "config.yaml").unlink()  # no config at all: the same, not a failure
    write_report([run], tmp_path / "out")
    assert "no config.yaml" in Page((tmp_path / "out" / "report.html").read_text()).body_text()


def test_gallery_limits_and_missing_images(tmp_path):
    run = make_run(tmp_path)
    (tmp_path / "data" / "images" / "2.png").unlink()
    html = render_html([run], load_series([run]), gallery_per_cycle=1)
    page = Page(html)
    assert len([i for i in page.images if i.get("alt", "").startswith("image ")]) == 6  # 1 a cycle, 3 labels
    text = page.body_text()
    assert "8 images selected, the first 1 shown" in text
    assert "image file missing" not in text  # 2 is entropy-max's second image: not shown with 1 a cycle
    html = render_html([run], load_series([run]), gallery_per_cycle=2)
    assert "image file missing" in Page(html).body_text()


def test_report_html_without_mgral_has_no_mgral_section(tmp_path):
    run = make_run(tmp_path)
    shutil.rmtree(run / "mgral")
    write_report([run], tmp_path / "out")
    page = Page((tmp_path / "out" / "report.html").read_text())
    assert "mgral" not in page.ids and "mgral-summary" not in page.tables
    assert not (tmp_path / "out" / "mgral_diagnostics.png").exists()
    assert re.search(r"Strategies: entropy-max \(entropy\), random; seeds: 0, 1", page.body_text())


def test_reward_first_to_last_is_the_plotted_running_mean_at_both_ends(tmp_path):
    """The table's "first → last" are the ends of the running mean the plot draws: the mean of
    the first 10 updates and of the last 10 (not the first raw update against a mean)."""
    rewards = [0.5] + [0.01 * k for k in range(1, 30)]  # 30 updates; a first update far off the rest
    run = make_run(tmp_path)
    write_mgral(run / "mgral" / "seed-0" / "cycle-0", loo=0.5, rewards=rewards)
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    (d, _) = load_mgral_diagnostics(run)
    assert (d.reward_first, d.reward_last) == (pytest.approx(first), pytest.approx(last))
    updates, trend = reward_trend(d.agent["update"], d.agent["reward_mean"])
    np.testing.assert_array_equal(updates, np.arange(9, 30))  # a point at the end of each full window
    assert (trend[0], trend[-1]) == (pytest.approx(first), pytest.approx(last))
    page = Page(render_html([run], load_series([run]), diagnostics=[d]))
    head, row = page.tables["mgral-summary"]
    assert row[4] == f"{first:.4f} → {last:.4f}" == "0.0950 → 0.2450"
    assert "the first 10 and the last 10 updates" in page.body_text()
    (svg,) = plot_mgral_diagnostics([d], tmp_path / "out", formats=("svg",))
    assert "running mean of 10 updates" in svg.read_text()
    # fewer than 20 updates: the first and last half; 3: the first and last update
    _, trend = reward_trend(np.arange(7), np.array([1.0, 2, 3, 4, 5, 6, 7]))
    np.testing.assert_allclose(trend[[0, -1]], [2.0, 6.0])
    assert (load_mgral_diagnostics(make_run(tmp_path / "b"))[0].reward_last) == 0.05


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A tiny real run (mgral's own loop): one seed of entropy, one selecting cycle, reported."""
    tmp = tmp_path_factory.mktemp("real")
    config = {
        "name": "tiny",
        "dataset": {"path": str(tmp / "digits"), "synth": {"images": 24, "image_size": 48, "max_digit_size": 20}},
        "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 1, "batch_size": 4}},
        "strategies": [{"name": "entropy"}],
        "initial": {"size": 8},
        "budget": 4,
        "cycles": 1,
        "seeds": [0],
    }
    run_experiment(config_from_dict(config), tmp / "run", log=lambda _: None)
    write_report([tmp / "run"], tmp / "out")
    return tmp / "run", tmp / "out"


def test_a_real_runs_cycle0_gallery_reads_the_shared_models_predictions(real_run):
    run, out = real_run
    assert (run / "_shared" / "seed-0" / "cycle-0" / "predictions.npz").is_file()  # where the loop caches them
    assert not (run / "entropy" / "seed-0" / "cycle-0" / "predictions.npz").exists()
    text = Page((out / "report.html").read_text()).body_text()
    assert "cycle 0: 4 images selected" in text and "no predictions cached" not in text
    # every thumbnail says how many boxes the cycle-0 model predicted on it
    assert len(re.findall(r"\d+ box(?:es)? ≥ 0\.3", text)) == 4


def test_a_real_one_seed_report_prints_no_spread(real_run):
    _, out = real_run
    for name in ("results.md", "report.html"):
        assert "± 0.0000" not in (out / name).read_text()
    with open(out / "results.csv", newline="") as fh:
        (row,) = csv.DictReader(fh)
    assert row["c0_mAP_std"] == row["c1_mAP_std"] == row["nauc_std"] == "" and row["c1_mAP_mean"] != ""
