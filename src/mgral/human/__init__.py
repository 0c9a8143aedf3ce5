"""The human in the loop: people label the chosen images in their own tool.

The cycle itself is :class:`mgral.series.Series`'s, as in a simulated run; this package is
the part that waits for people: the two commands (``session``), the labeling package
(``package``), reading their answers (``answers``) and the labels imported so far
(``labels``).

A run whose config has ``oracle.kind: human`` advances one query round at a time, by two
commands (each takes the run's lock, so they never interleave):

``mgral query`` (:func:`query`)
    Trains the model of the current cycle on the images labeled so far (reused when already
    trained: a cycle's labeled set is final once the cycle before it is answered), evaluates
    it on the test split when that split has labels, selects ``budget`` images with the
    configured strategy, records the request in the ledger and saves it, and only then
    writes the labeling package ``RUN/<label>/seed-<s>/cycle-<c>/labeling/`` (all or
    nothing): ``images.txt`` (absolute image paths), ``predictions_coco.json`` (COCO with
    the model's boxes and scores as pre-annotations), ``label_studio_tasks.json`` and
    ``label_studio_config.xml`` (:mod:`mgral.data.labelstudio`). While a request is pending,
    ``query`` selects nothing: it re-writes the package for the images still pending.
    The first run of ``query --config CONFIG`` creates the run.

``mgral import-labels`` (:func:`import_labels`)
    Reads the annotated images (COCO JSON, VOC or YOLO directory, Label Studio JSON export),
    matches them to the dataset's images (Label Studio: ``data.mgral_id``; otherwise by file
    path, then by file name), validates everything before changing anything, stores the
    labels (``RUN/<label>/seed-<s>/labels.json``, COCO, written atomically) *then* resolves
    the ledger and saves it. When no image of the request is pending any more, the cycle's
    record is appended to ``cycles.jsonl`` (what ``mgral report`` reads; ``mAP`` is null
    where the test split has no labels).

Rules:

* **Initial set** (cycle 0): ``initial.ids_file`` (those pool images; labels from the
  dataset file, no boxes there = labeled, no objects) or ``initial.from_dataset: true`` (the
  pool images with at least one box in the dataset file; an image labeled "empty" cannot be
  told from an unlabeled one, so list such images in an ids file). An empty initial set is a
  cold start: the first query picks ``budget`` pool images at random (no model, no
  pre-annotations). The dataset file's boxes on other pool images are never used.
* **Labeled / skipped**: an image in the file is labeled, with its boxes, none meaning "no
  objects" (a COCO image without annotations, an empty Label Studio result, a VOC XML
  without objects, a YOLO image without a label file). Skipped: a Label Studio task whose
  annotations are all cancelled (*Skip*), or, with ``skip_missing`` / ``--skip-missing``,
  every pending image the file does not label. A skipped image is never asked again.
* **Partial imports** are allowed: pending images the file does not label stay pending;
  ``query`` re-writes the package for them; the cycle finishes when none is left.
* **Refused** (nothing changes): labels for an image that was not asked for (never
  requested, in the test split, or not in the dataset), a category whose name is not one
  of the dataset's, an image twice in the file, a box outside its image (unless
  ``clip_boxes``), an image size that differs from the dataset's, labels that differ from
  the ones already imported for an image, a label for an image skipped before.
* **Idempotent**: images already imported with the same labels (or skipped again) are
  counted and ignored, so importing a file twice, or an export that also holds earlier
  rounds, changes nothing the second time.
"""

from mgral.human.answers import IMPORT_FORMATS, Matcher
from mgral.human.labels import LabelStore, read_labels, write_labels
from mgral.human.package import write_package
from mgral.human.session import DEFAULT_MIN_SCORE, ImportResult, QueryResult, human_initial_ids, import_labels, query

__all__ = [
    "DEFAULT_MIN_SCORE",
    "IMPORT_FORMATS",
    "ImportResult",
    "LabelStore",
    "Matcher",
    "QueryResult",
    "human_initial_ids",
    "import_labels",
    "query",
    "read_labels",
    "write_labels",
    "write_package",
]
