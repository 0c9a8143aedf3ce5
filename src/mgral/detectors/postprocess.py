"""Post-processing that keeps each kept box's full class-probability vector.

torchvision's detection models compute a class distribution for every candidate box and
then throw it away: ``postprocess_detections`` keeps only the winning class's score.
Uncertainty strategies (entropy, margin, least confidence) and MGRAL's label-free features
need the whole vector, so these functions are torchvision's own post-processing (same
thresholds, top-k, clipping and NMS, in the same order, so boxes, scores and labels are
identical, except that one-stage heads no longer emit background-class boxes) with the
candidate index carried through to gather the distribution of every kept box. They are
bound onto a model instance by ``keep_class_probabilities``.

The vector has ``num_classes`` entries (torchvision's class indices: 0 is background):
* two-stage (Faster R-CNN): the RoI head's softmax, background included;
* one-stage sigmoid heads (RetinaNet, FCOS): the per-class logits read as log-odds
  against background, i.e. ``softmax([0, z_1, ..., z_K])``; for one class this is exactly
  the sigmoid, and the column-0 logit (a class torchvision never trains as positive) is
  replaced by that fixed 0 background logit;
* SSD: its softmax over classes, background included.
Every row sums to 1. Each image's vectors are stored in ``detection["probs"]``
(float32 ``[N, num_classes]``), with ``detection["num_candidates"]`` (pre-NMS count); Faster
R-CNN, RetinaNet and FCOS also give ``detection["rows"]`` (int64 ``[N]``): the proposal, or the
anchor (levels in order), each box was regressed from.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops


def sigmoid_logits_to_probs(logits: Tensor) -> Tensor:
    """``[N, C]`` per-class logits (column 0 unused) -> ``[N, C]`` distribution, background first."""
    z = logits.clone()
    z[:, 0] = 0.0
    return F.softmax(z, dim=-1)


def _roi_heads_postprocess(self, class_logits, box_regression, proposals, image_shapes):
    # torchvision RoIHeads.postprocess_detections (0.29), plus the source-row gather.
    device = class_logits.device
    num_classes = class_logits.shape[-1]
    boxes_per_image = [p.shape[0] for p in proposals]
    pred_boxes = self.box_coder.decode(box_regression, proposals)
    pred_scores = F.softmax(class_logits, -1)
    out_boxes, out_scores, out_labels, out_probs, out_rows, out_counts = [], [], [], [], [], []
    for boxes, scores, image_shape in zip(
        pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0), image_shapes, strict=True
    ):
        probs = scores
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        rows = torch.arange(scores.shape[0], device=device).view(-1, 1).expand_as(scores)
        boxes, scores, labels, rows = boxes[:, 1:], scores[:, 1:], labels[:, 1:], rows[:, 1:]
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        labels, rows = labels.reshape(-1), rows.reshape(-1)
        inds = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels, rows = boxes[inds], scores[inds], labels[inds], rows[inds]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
        out_counts.append(int(boxes.shape[0]))
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        out_boxes.append(boxes[keep])
        out_scores.append(scores[keep])
        out_labels.append(labels[keep])
        out_probs.append(probs[rows[keep]])
        out_rows.append(rows[keep])
    self._mgral_extra = [
        {"probs": p, "rows": r, "num_candidates": c} for p, r, c in zip(out_probs, out_rows, out_counts, strict=True)
    ]
    return out_boxes, out_scores, out_labels


def _one_stage_postprocess(self, head_outputs, anchors, image_shapes):
    # torchvision RetinaNet / FCOS postprocess_detections (0.29), plus the anchor gather.
    class_logits = head_outputs["cls_logits"]
    box_regression = head_outputs["bbox_regression"]
    box_ctrness = head_outputs.get("bbox_ctrness")
    decode = self.box_coder.decode if box_ctrness is not None else self.box_coder.decode_single
    detections = []
    for index in range(len(image_shapes)):
        image_boxes, image_scores, image_labels, image_probs, image_rows = [], [], [], [], []
        offset = 0
        for level, (box_regression_per_level, logits_per_level, anchors_per_level) in enumerate(
            zip([br[index] for br in box_regression], [cl[index] for cl in class_logits], anchors[index], strict=True)
        ):
            num_classes = logits_per_level.shape[-1]
            scores_per_level = torch.sigmoid(logits_per_level)
            if box_ctrness is not None:  # FCOS: geometric mean with centerness
                scores_per_level = torch.sqrt(scores_per_level * torch.sigmoid(box_ctrness[level][index]))
            # torchvision also ranks class index 0 (background) here; an untrained or weak head
            # then emits "background" detections. They are meaningless, so they are dropped.
            scores_per_level = scores_per_level.clone()
            scores_per_level[:, 0] = 0.0
            scores_per_level = scores_per_level.flatten()
            keep_idxs = scores_per_level > self.score_thresh
            scores_per_level = scores_per_level[keep_idxs]
            topk_idxs = torch.where(keep_idxs)[0]
            num_topk = det_utils._topk_min(topk_idxs, self.topk_candidates, 0)
            scores_per_level, idxs = scores_per_level.topk(num_topk)
            topk_idxs = topk_idxs[idxs]
            anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
            boxes_per_level = decode(box_regression_per_level[anchor_idxs], anchors_per_level[anchor_idxs])
            image_boxes.append(box_ops.clip_boxes_to_image(boxes_per_level, image_shapes[index]))
            image_scores.append(scores_per_level)
            image_labels.append(topk_idxs % num_classes)
            image_probs.append(sigmoid_logits_to_probs(logits_per_level[anchor_idxs]))
            image_rows.append(anchor_idxs + offset)
            offset += len(anchors_per_level)
        image_boxes = torch.cat(image_boxes)
        image_scores = torch.cat(image_scores)
        image_labels = torch.cat(image_labels)
        image_probs = torch.cat(image_probs)
        image_rows = torch.cat(image_rows)
        keep = box_ops.batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)[: self.detections_per_img]
        detections.append(
            {
                "boxes": image_boxes[keep],
                "scores": image_scores[keep],
                "labels": image_labels[keep],
                "probs": image_probs[keep],
                "rows": image_rows[keep],
                "num_candidates": int(image_boxes.shape[0]),
            }
        )
    return detections


def _ssd_postprocess(self, head_outputs, image_anchors, image_shapes):
    # torchvision SSD.postprocess_detections (0.29), plus the anchor gather.
    bbox_regression = head_outputs["bbox_regression"]
    pred_scores = F.softmax(head_outputs["cls_logits"], dim=-1)
    num_classes = pred_scores.size(-1)
    device = pred_scores.device
    detections = []
    per_image = zip(bbox_regression, pred_scores, image_anchors, image_shapes, strict=True)
    for boxes, scores, anchors, image_shape in per_image:
        boxes = box_ops.clip_boxes_to_image(self.box_coder.decode_single(boxes, anchors), image_shape)
        image_boxes, image_scores, image_labels, image_rows = [], [], [], []
        for label in range(1, num_classes):
            score = scores[:, label]
            rows = torch.where(score > self.score_thresh)[0]
            score = score[rows]
            num_topk = det_utils._topk_min(score, self.topk_candidates, 0)
            score, idxs = score.topk(num_topk)
            rows = rows[idxs]
            image_boxes.append(boxes[rows])
            image_scores.append(score)
            image_labels.append(torch.full_like(score, fill_value=label, dtype=torch.int64, device=device))
            image_rows.append(rows)
        image_boxes = torch.cat(image_boxes, dim=0)
        image_scores = torch.cat(image_scores, dim=0)
        image_labels = torch.cat(image_labels, dim=0)
        image_rows = torch.cat(image_rows, dim=0)
        keep = box_ops.batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)[: self.detections_per_img]
        detections.append(
            {
                "boxes": image_boxes[keep],
                "scores": image_scores[keep],
                "labels": image_labels[keep],
                "probs": scores[image_rows[keep]],
                "num_candidates": int(image_boxes.shape[0]),
            }
        )
    return detections


def _faster_rcnn_forward_hook(module: nn.Module, args, output):
    # GeneralizedRCNN rescales boxes after RoIHeads; the probability rows travel beside them.
    if module.training or not isinstance(output, list):
        return output
    extra = getattr(module.roi_heads, "_mgral_extra", None)
    if extra is not None and len(extra) == len(output):
        for det, ex in zip(output, extra, strict=True):
            det.update(ex)
        module.roi_heads._mgral_extra = None
    return output


def keep_class_probabilities(model: nn.Module) -> nn.Module:
    """Bind the probability-keeping post-processing onto ``model`` (in place) and return it.

    Supports torchvision's FasterRCNN, RetinaNet, FCOS and SSD (and subclasses).
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, FasterRCNN):
        model.roi_heads.postprocess_detections = types.MethodType(_roi_heads_postprocess, model.roi_heads)
        model.register_forward_hook(_faster_rcnn_forward_hook)
    elif isinstance(model, (RetinaNet, FCOS)):
        model.postprocess_detections = types.MethodType(_one_stage_postprocess, model)
    elif isinstance(model, SSD):
        model.postprocess_detections = types.MethodType(_ssd_postprocess, model)
    else:
        raise TypeError(f"keep_class_probabilities: unsupported model type {type(model).__name__}")
    return model
