"""What people answered: the images of an annotation file (COCO, VOC, YOLO, a Label Studio
export) matched to the dataset's images, with their boxes, or skipped."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mgral.data import labelstudio
from mgral.data.records import Dataset, ImageId, Target, describe_image
from mgral.errors import DatasetError

IMPORT_FORMATS = ("coco", "voc", "yolo", "label-studio")

_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio renames uploaded files "<8 hex>-<name>"


@dataclass
class Answer:
    image_id: ImageId
    target: Target | None  # None: skipped
    where: str  # the entry in the file and the dataset image it is, for messages


class Matcher:
    """Finds the dataset image an annotation file's image reference means."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.by_rel: dict[str, ImageId] = {}
        self.by_abs: dict[str, ImageId] = {}
        self.by_base: dict[str, list[ImageId]] = {}
        for rec in dataset:
            rel = rec.file_name.replace("\\", "/")
            self.by_rel[rel] = rec.id
            self.by_abs[os.path.abspath(dataset.root / rec.file_name)] = rec.id
            self.by_base.setdefault(rel.rsplit("/", 1)[-1], []).append(rec.id)

    def find(self, ref: str, *, where: str) -> ImageId | None:
        path = clean_ref(ref)
        if not path:
            return None
        if path in self.by_abs:
            return self.by_abs[path]
        parts = [p for p in path.split("/") if p not in ("", ".")]
        for k in range(len(parts)):  # the longest tail of the path that is a dataset file name
            tail = "/".join(parts[k:])
            if tail in self.by_rel:
                return self.by_rel[tail]
        if not parts:
            return None
        for base in dict.fromkeys((parts[-1], _LS_UPLOAD_PREFIX.sub("", parts[-1]))):
            found = self.by_base.get(base, [])
            if len(found) > 1:
                shown = ", ".join(describe_image(i, self.dataset[i].file_name) for i in found[:4])
                raise DatasetError(
                    f"{where}: the file name {base!r} is ambiguous: it is {shown}; expected the image's path "
                    "relative to the dataset's image root (or keep data.mgral_id in Label Studio tasks)"
                )
            if found:
                return found[0]
        return None


def clean_ref(ref: str) -> str:
    ref = ref.strip()
    if "?d=" in ref:  # Label Studio local files: /data/local-files/?d=<path>
        ref = ref.split("?d=", 1)[1]
    elif "://" in ref:
        ref = urlparse(ref).path
    ref = unquote(ref).replace("\\", "/")
    return os.path.normpath(ref) if ref.startswith("/") else ref


def detect_format(path: Path) -> str:
    from mgral.data._layout import read_json
    from mgral.data.formats import detect_format

    if path.is_file() and path.suffix.lower() == ".json":
        return (
            "label-studio" if isinstance(read_json(path, expected="a COCO or Label Studio JSON file"), list) else "coco"
        )
    return detect_format(path)


def read_answers(path: Path, fmt: str, dataset: Dataset, *, clip: bool) -> tuple[list[Answer], int]:
    """The file's images as dataset ids with their targets (None: skipped), and the number of
    Label Studio tasks without annotation. Everything is validated; nothing is changed."""
    matcher = Matcher(dataset)
    source = str(path)
    answers: list[Answer] = []
    unlabeled = 0
    if fmt == "label-studio":
        for task in labelstudio.read_export(path):
            entry = f"{source}: {task.describe()}"
            image_id = task.mgral_id if task.mgral_id in dataset else matcher.find(task.image, where=entry)
            if image_id is None:
                raise DatasetError(
                    f"{entry}: matches no image of the dataset (data.mgral_id {task.mgral_id!r}, data.image "
                    f"{task.image!r}); expected tasks made from a labeling package (label_studio_tasks.json), or "
                    "images named by their path relative to the dataset's image root"
                )
            rec = dataset[image_id]
            where = f"{task.describe()} = {describe_image(rec.id, rec.file_name)}"
            if task.status == "unlabeled":
                unlabeled += 1
                continue
            target = None
            if task.status == "labeled":
                target = labelstudio.task_target(
                    task,
                    width=rec.width,
                    height=rec.height,
                    categories=dataset.categories,
                    source=source,
                    where=where,
                    clip=clip,
                )
            answers.append(Answer(image_id, target, f"{source}: {where}"))
    else:
        from mgral.data.formats import read_dataset

        # a labels-only YOLO export finds its images under the dataset's image root
        root = {"image_root": dataset.root} if fmt == "yolo" else {}
        result = read_dataset(path, fmt, check_files=False, clip_boxes=clip, **root)
        names = result.category_names
        ours = {c.name: c.id for c in dataset.categories}
        for rec in result:
            entry = f"{source}: {describe_image(rec.id, rec.file_name)}"
            image_id = matcher.find(rec.file_name, where=entry)
            if image_id is None:
                raise DatasetError(
                    f"{entry}: matches no image of the dataset; expected the file name of an image the query asked "
                    "for (see images.txt of the labeling package), as a path relative to the dataset's image root "
                    "or a file name"
                )
            known = dataset[image_id]
            where = f"{entry} = {describe_image(known.id, known.file_name)}"
            if (rec.width, rec.height) != (known.width, known.height):
                raise DatasetError(
                    f"{where}: the file says the image is {rec.width}x{rec.height}, the dataset {known.width}x"
                    f"{known.height}; expected the boxes of the dataset's image file (not a resized copy)"
                )
            labels = []
            for k, label in enumerate(rec.target.labels.tolist()):
                name = names.get(label)
                if name not in ours:
                    raise DatasetError(
                        f"{where}: box {k}: category {name!r} (id {label}) is not a category of the dataset; expected "
                        f"one of {sorted(ours)} (rename the label in your tool, or remove the box)"
                    )
                labels.append(ours[name])
            t = rec.target
            answers.append(Answer(image_id, Target(t.boxes, labels, t.difficult, t.iscrowd), where))
    seen: dict[ImageId, str] = {}
    for a in answers:
        if a.image_id in seen:
            raise DatasetError(
                f"{a.where}: the image is in the file twice (also {seen[a.image_id]}); expected each image once: "
                "remove one of them"
            )
        seen[a.image_id] = a.where
    return answers, unlabeled
