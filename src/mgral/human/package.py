"""The labeling package of a request: what people need to label the images a query asked for."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mgral._io import atomic_directory, atomic_write_json, atomic_write_text
from mgral.data import labelstudio
from mgral.data.records import Dataset, Detections, ImageId, ImageRecord, Target


def write_package(
    out: Path,
    dataset: Dataset,
    ids: Sequence[ImageId],
    predictions: Mapping[ImageId, Detections] | None,
    *,
    min_score: float,
    model_version: str,
    image_url_prefix: str | None = None,
    run_dir: Path | None = None,
    series: tuple[str, int] | None = None,
) -> Path:
    """Write the labeling package of ``ids`` into ``out``, replacing it whole (never half-written)."""
    from mgral.data.coco import flat_name_clash, to_coco_dict

    records, scores = [], []
    for i in ids:
        rec = dataset[i]
        det = predictions.get(i) if predictions is not None else None
        target = Target()
        if det is not None:  # the same boxes as the Label Studio tasks' (class-agnostic suppression included)
            boxes, keep = labelstudio.pre_annotations(det, rec.width, rec.height, min_score=min_score)
            target = Target(boxes[keep], det.labels[keep])
            scores += det.scores[keep].tolist()
        records.append(ImageRecord(rec.id, rec.file_name, rec.width, rec.height, target=target))
    chosen = Dataset(dataset.root, dataset.categories, records)
    clash = flat_name_clash(chosen)  # CVAT names uploaded images by their base names: use them where unambiguous
    coco = to_coco_dict(chosen, flat_names=clash is None)
    for ann, score in zip(coco["annotations"], scores, strict=True):
        ann["score"] = round(score, 4)
    for entry, i in zip(coco["images"], ids, strict=True):
        entry["mgral_id"] = i  # the dataset's id (COCO ids are renumbered when the dataset's are not ints)

    def image_ref(rec: ImageRecord) -> str:
        if image_url_prefix is not None:
            return image_url_prefix + rec.file_name
        return os.path.abspath(dataset.root / rec.file_name)

    tasks = labelstudio.to_tasks(
        dataset, ids, predictions, image_ref=image_ref, model_version=model_version, min_score=min_score
    )
    paths = "".join(os.path.abspath(dataset.image_path(i)) + "\n" for i in ids)
    where = f"--run {run_dir} " if run_dir is not None else ""
    if series is not None:
        where += f"--strategy {series[0]} --seed {series[1]} "
    names = (
        "file_name is the image's base name, as CVAT names the files of images.txt uploaded to a task"
        if clash is None
        else f"file_name is the path below the dataset root (upload the images in their folders: {clash})"
    )
    readme = (
        f"{len(ids)} images to label ({model_version}).\n\n"
        "images.txt               the image files, one absolute path a line\n"
        f"predictions_coco.json    the model's boxes scoring >= {min_score:g}, as pre-annotations (COCO: CVAT, ...)\n"
        f"                         {names}\n"
        "label_studio_tasks.json  the same boxes as Label Studio tasks, for a project whose labeling config is\n"
        "                         label_studio_config.xml (keep data.mgral_id: it finds the image again);\n"
        "                         sort the Data Manager by data.mgral_rank: 000001 is the image to label first\n\n"
        "Label every image (an image with nothing in it: no boxes), export, then:\n"
        f"    mgral import-labels {where}FILE [--format coco|voc|yolo|label-studio]\n"
        "An image you cannot label: Skip it in Label Studio, or leave it out of the file and add --skip-missing.\n"
    )
    with atomic_directory(out, overwrite=True, owned=True, what="a labeling package") as tmp:
        atomic_write_text(tmp / "images.txt", paths)
        atomic_write_json(tmp / "predictions_coco.json", coco, indent=1)
        atomic_write_json(tmp / "label_studio_tasks.json", tasks, indent=1)
        atomic_write_text(tmp / "label_studio_config.xml", labelstudio.labeling_config(dataset.categories))
        atomic_write_text(tmp / "README.txt", readme)
    return out
