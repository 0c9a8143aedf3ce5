"""Exact COCO box AP of any subset of images from one matching pass.

cocoapi (Lin et al. 2014; https://github.com/cocodataset/cocoapi, ``COCOeval``) matches
detections to ground truth per image and class (``evaluateImg``), then pools all images
per class (``accumulate``). Matching never looks across images, so the match outcome of
every detection -- per IoU threshold and area range -- can be computed once for the whole
dataset and reused for any subset of images, or any multiset (bootstrap resampling).

Why this is hand-written rather than taken from a library: neither pycocotools nor
faster-coco-eval exposes per-image match results that can be re-accumulated cheaply
(pycocotools' ``evalImgs`` are Python dicts, too slow to pool thousands of times;
faster-coco-eval's are opaque C++ objects, and its ``accumulate`` costs as much as the
evaluation itself). The code reproduces cocoapi step by step; the comments name the step.

Matching (``evaluateImg``), per image, class, area range and IoU threshold ``t``:
detections in descending score order (stable, top 100); each takes, among ground truth not
yet matched (crowd ground truth can be matched again) with ``IoU >= t``, the one with the
highest IoU, the *last* one in dataset order on ties, preferring ground truth that is not
ignored (crowd, or outside the area range); matched to ignored ground truth -> ignored;
unmatched and outside the area range -> ignored.

Accumulation (``accumulate``), per class: detections of all images in one order (score
descending, ties by image id then rank in the image); cumulative TP and FP; precision
``tp / (tp + fp + eps)``, made monotone from the right, sampled at the first index whose
recall ``tp / npig`` reaches each of 101 recall thresholds (0 beyond the last).

Only TP detections need a precision value: the monotone envelope at any index is the
maximum precision over the TPs at or after it, and the first index reaching a recall
threshold is always a TP. So each subset evaluation touches every detection once (one
cumulative count of the weights) and otherwise only the TP / ignored events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mgral.evaluation._flat import Flat

IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
"""cocoapi ``Params.iouThrs`` (same expression, so the same float64 values)."""
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
"""cocoapi ``Params.recThrs``."""
AREA_RANGES = np.array([[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]], dtype=np.float64)
"""cocoapi ``Params.areaRng``: all, small, medium, large (pixels², both bounds inclusive)."""
MAX_DETS = (1, 10, 100)
"""cocoapi ``Params.maxDets``."""

_EPS = np.spacing(1)
_UNMATCHED, _TP, _IGNORED = 0, 1, 2
_ROW_STRIDE = np.int64(1) << np.int64(40)  # > any weighted TP count; rows * stride stays < 2**63


def bbox_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Element-wise IoU of xywh boxes ``d[i]`` and ``g[i]`` (float64 ``[N, 4]`` each).

    For crowd ground truth the union is the detection's area (cocoapi). Same operations
    in the same order as cocoapi's ``maskApi.c:bbIou``, so the values are bit-identical.
    """
    da = d[:, 2] * d[:, 3]
    ga = g[:, 2] * g[:, 3]
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    union = np.where(crowd, da, da + ga - inter)
    overlap = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def run_starts(keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in ``keys``."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of ``keys``."""
    starts = run_starts(keys)
    lengths = np.diff(np.r_[starts, len(keys)])
    return np.arange(len(keys)) - np.repeat(starts, lengths)


def _ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat([arange(s, s + c) for s, c in zip(starts, counts)])`` without a loop."""
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.arange(total) - np.repeat(offsets - starts, counts)


@dataclass
class CocoMatches:
    """Every detection's cocoapi match outcome, and the non-ignored ground-truth counts.

    Detections (the top 100 per image and class) are stored in *accumulation order*:
    class by class, and within a class in cocoapi's global order (score descending, then
    image, then rank within the image).

    Attributes:
        num_images, num_classes: I and K.
        det_img: int64 ``[N]`` image index; det_cls: int64 ``[N]`` class index.
        det_rank: int64 ``[N]`` rank by score within its image and class (for maxDets).
        det_area: float64 ``[N]`` box area (pixels²).
        cls_start: int64 ``[K + 1]`` where each class's detections start.
        ev_pos: int64 ``[C]`` positions of the detections matched at some threshold/area.
        ev_out: int8 ``[C, T, A]`` their outcome: 0 unmatched, 1 TP, 2 matched to ignored.
        gt_img, gt_key, gt_count: per (image, area range, class) with non-ignored ground
            truth: image index, ``area * K + class``, and the count.
    """

    num_images: int
    num_classes: int
    det_img: np.ndarray
    det_cls: np.ndarray
    det_rank: np.ndarray
    det_area: np.ndarray
    cls_start: np.ndarray
    ev_pos: np.ndarray
    ev_out: np.ndarray
    gt_img: np.ndarray
    gt_key: np.ndarray
    gt_count: np.ndarray


def _gt_ignored(area: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """bool ``[A, G]``: ground truth ignored in each area range (cocoapi ``_ignore``)."""
    lo, hi = AREA_RANGES[:, :1], AREA_RANGES[:, 1:]
    return crowd[None, :] | (area[None, :] < lo) | (area[None, :] > hi)


def _match_bucket(
    iou_rows: np.ndarray, row_start: np.ndarray, n_cand: np.ndarray, ignored: np.ndarray, crowd: np.ndarray
) -> np.ndarray:
    """Greedy cocoapi matching of many (image, class) pairs at once, detection by detection.

    Args:
        iou_rows: float64 ``[C, Gb]`` IoU of each candidate detection with its pair's
            ground truth (padding -1), candidates of a pair consecutive, by score.
        row_start: int64 ``[P]`` first row of each pair; pairs sorted by ``n_cand``
            descending so that the pairs still matching at step r are a prefix.
        n_cand: int64 ``[P]`` candidates per pair.
        ignored: bool ``[P, A, Gb]`` ground truth ignored per area range (padding True).
        crowd: bool ``[P, Gb]``.

    Returns:
        int8 ``[C, T, A]`` outcome of each row.
    """
    num_pairs, gb = crowd.shape
    t, a = len(IOU_THRS), len(AREA_RANGES)
    taken = np.zeros((num_pairs, t, a, gb), dtype=bool)
    out = np.zeros((len(iou_rows), t, a), dtype=np.int8)
    regular = ~ignored[:, None, :, :]
    reusable = crowd[:, None, None, :]
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[None, :, None]
    for r in range(int(n_cand[0]) if num_pairs else 0):
        n = int(np.count_nonzero(n_cand > r))
        rows = row_start[:n] + r
        iou = iou_rows[rows]
        eligible = (iou[:, None, :] >= thr)[:, :, None, :] & (~taken[:n] | reusable[:n])
        eligible_regular = eligible & regular[:n]
        has_regular = eligible_regular.any(axis=-1)
        # cocoapi stops at the first ignored ground truth once a regular one matched
        cand = np.where(has_regular[..., None], eligible_regular, eligible)
        key = np.where(cand, iou[:, None, None, :], -1.0)
        best = key.max(axis=-1)
        matched = best >= 0
        # ties go to the last ground truth (cocoapi replaces on ``>=``)
        last = gb - 1 - np.argmax((key == best[..., None])[..., ::-1], axis=-1)
        out[rows] = np.where(matched, np.where(has_regular, _TP, _IGNORED), _UNMATCHED)
        p, ti, ai = np.nonzero(matched)
        taken[p, ti, ai, last[p, ti, ai]] = True
    return out


def match_coco(flat: Flat) -> CocoMatches:
    """One cocoapi matching pass over the whole flat dataset (see the module docstring)."""
    k_num = flat.num_classes
    t_num, a_num = len(IOU_THRS), len(AREA_RANGES)
    # cocoapi evaluateImg: per (image, class), detections by score (stable), top maxDets[-1]
    nd = len(flat.dt_img)
    o = np.lexsort((np.arange(nd), -flat.dt_score, flat.dt_cls, flat.dt_img))
    pair = flat.dt_img[o] * k_num + flat.dt_cls[o]
    rank = rank_in_runs(pair)
    keep = rank < MAX_DETS[-1]
    o, pair, rank = o[keep], pair[keep], rank[keep]
    d_xywh = flat.dt_xywh[o]

    ng_all = len(flat.gt_img)
    g = np.lexsort((np.arange(ng_all), flat.gt_cls, flat.gt_img))
    g_pair = flat.gt_img[g] * k_num + flat.gt_cls[g]
    g_xywh, g_crowd, g_area = flat.gt_xywh[g], flat.gt_crowd[g], flat.gt_area[g]
    g_ignored = _gt_ignored(g_area, g_crowd)
    g_first = np.searchsorted(g_pair, pair, side="left")
    g_num = np.searchsorted(g_pair, pair, side="right") - g_first

    # IoU of every detection with every ground truth of its pair (cocoapi computeIoU)
    di = np.flatnonzero(g_num > 0)
    counts = g_num[di]
    block = np.cumsum(counts) - counts
    gi = _ragged_arange(g_first[di], counts)
    owner = np.repeat(np.arange(len(di)), counts)
    iou = bbox_iou(d_xywh[di][owner], g_xywh[gi], g_crowd[gi])
    best = np.maximum.reduceat(iou, block) if len(iou) else np.zeros(0)
    # a detection below the lowest threshold with every ground truth never matches
    is_cand = best >= np.minimum(IOU_THRS[0], 1 - 1e-10)
    cand, cand_block = di[is_cand], block[is_cand]

    out = np.zeros((len(cand), t_num, a_num), dtype=np.int8)
    if len(cand):
        c_pair = pair[cand]
        p_first = run_starts(c_pair)
        p_cnt = np.diff(np.r_[p_first, len(cand)])
        p_gnum = g_num[cand[p_first]]
        p_gfirst = g_first[cand[p_first]]
        # pad each pair's ground truth to a power of two: few buckets, little padding
        bucket = 1 << np.ceil(np.log2(p_gnum)).astype(np.int64)
        for gb in np.unique(bucket):
            sel = np.flatnonzero(bucket == gb)
            sel = sel[np.argsort(-p_cnt[sel], kind="stable")]
            cnt = p_cnt[sel]
            rows = _ragged_arange(p_first[sel], cnt)
            col = np.arange(gb)
            valid_c = col[None, :] < g_num[cand[rows]][:, None]
            src = cand_block[rows][:, None] + col[None, :]
            iou_rows = np.where(valid_c, iou[np.where(valid_c, src, 0)], -1.0)
            valid_g = col[None, :] < p_gnum[sel][:, None]
            gidx = np.where(valid_g, p_gfirst[sel][:, None] + col[None, :], 0)
            ign = np.where(valid_g[:, None, :], g_ignored[:, gidx].transpose(1, 0, 2), True)
            crowd = np.where(valid_g, g_crowd[gidx], False)
            row_start = np.cumsum(cnt) - cnt
            out[rows] = _match_bucket(iou_rows, row_start, cnt, ign, crowd)

    # cocoapi accumulate: per class, score descending, ties by image then rank (mergesort)
    img, cls, score = flat.dt_img[o], flat.dt_cls[o], flat.dt_score[o]
    order = np.lexsort((rank, img, -score, cls))
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    ever = out.any(axis=(1, 2))

    # non-ignored ground truth per (image, area range, class) (cocoapi npig)
    regular = ~_gt_ignored(flat.gt_area, flat.gt_crowd)
    a_idx, g_idx = np.nonzero(regular)
    key = (flat.gt_img[g_idx] * a_num + a_idx) * k_num + flat.gt_cls[g_idx]
    ukey, ucount = np.unique(key, return_counts=True)
    return CocoMatches(
        num_images=len(flat.image_ids),
        num_classes=k_num,
        det_img=img[order],
        det_cls=cls[order],
        det_rank=rank[order],
        det_area=flat.dt_area[o][order],
        cls_start=np.searchsorted(cls[order], np.arange(k_num + 1)),
        ev_pos=position[cand[ever]],
        ev_out=out[ever],
        gt_img=ukey // (a_num * k_num),
        gt_key=ukey % (a_num * k_num),
        gt_count=ucount,
    )


def _cumsum0(x: np.ndarray) -> np.ndarray:
    """``[len(x) + 1]`` exclusive prefix sums in ``x``'s dtype: ``out[i] = x[:i].sum()``."""
    out = np.empty(len(x) + 1, dtype=x.dtype)
    out[0] = 0
    np.cumsum(x, dtype=x.dtype, out=out[1:])
    return out


@dataclass
class _AreaEvents:
    """Precomputed layout of one area range's TP detections; a row is ``t * K + k``.

    A TP's false positives so far = detections of its class inside the area range up to
    it, minus those matched (TP or matched to ignored ground truth) at its threshold.
    """

    tp_img: np.ndarray  # [E] image of each TP, TPs by row then position
    tp_row: np.ndarray  # [E]
    tp_rank: np.ndarray  # [E] rank in its image and class (for maxDets)
    row_start: np.ndarray  # [T*K + 1] first TP of each row
    in_pos: np.ndarray | None  # positions inside the area range; None: all detections
    cnt_idx: np.ndarray  # [E] prefix index of the in-range count just after the TP
    cnt_base: np.ndarray  # [E] ... at its class's first detection
    # matched in-range detections, if they are not exactly the TPs (None: they are)
    m_pos: np.ndarray | None  # [M] by row then position
    m_idx: np.ndarray | None  # [E] prefix index of the matched count just after the TP
    m_row_base: np.ndarray | None  # [E] ... at its row's start


@dataclass(frozen=True)
class CocoCurves:
    """cocoapi ``precision`` ``[T, R, K]`` and ``recall`` ``[T, K]`` (-1 = undefined)."""

    precision: np.ndarray
    recall: np.ndarray


class CocoAccumulator:
    """cocoapi ``accumulate`` for any image weights, from one :func:`match_coco` pass."""

    def __init__(self, matches: CocoMatches) -> None:
        self.m = matches
        self._areas = [self._area_events(a) for a in range(len(AREA_RANGES))]

    def _area_events(self, a: int) -> _AreaEvents:
        m = self.m
        rows = len(IOU_THRS) * m.num_classes
        lo, hi = AREA_RANGES[a]
        det_in = (m.det_area >= lo) & (m.det_area <= hi)
        c_idx, t_idx = np.nonzero(m.ev_out[:, :, a])
        pos = m.ev_pos[c_idx]
        row = t_idx * m.num_classes + m.det_cls[pos]
        order = np.lexsort((pos, row))
        pos, row, out = pos[order], row[order], m.ev_out[c_idx[order], t_idx[order], a]
        tp = out == _TP
        tp_pos, tp_row = pos[tp], row[tp]
        row_start = np.searchsorted(tp_row, np.arange(rows + 1))
        class_first = m.cls_start[m.det_cls[tp_pos]]
        if det_in.all():
            in_pos = None
            cnt_idx, cnt_base = tp_pos + 1, class_first
        else:
            in_pos = np.flatnonzero(det_in)
            cnt_idx = np.searchsorted(in_pos, tp_pos, side="right")
            cnt_base = np.searchsorted(in_pos, class_first, side="left")
        matched = det_in[pos]
        m_pos = m_idx = m_row_base = None
        if not np.array_equal(matched, tp):
            m_pos, m_row = pos[matched], row[matched]
            m_row_start = np.searchsorted(m_row, np.arange(rows + 1))
            # matched events of the TP's row at or before it: rows are contiguous, so
            # search the (row, position) key
            m_key = m_row * np.int64(len(m.det_img) + 1) + m_pos
            m_idx = np.searchsorted(m_key, tp_row * np.int64(len(m.det_img) + 1) + tp_pos, side="right")
            m_row_base = m_row_start[tp_row]
        return _AreaEvents(
            tp_img=m.det_img[tp_pos],
            tp_row=tp_row,
            tp_rank=m.det_rank[tp_pos],
            row_start=row_start,
            in_pos=in_pos,
            cnt_idx=cnt_idx,
            cnt_base=cnt_base,
            m_pos=m_pos,
            m_idx=m_idx,
            m_row_base=m_row_base,
        )

    def npig(self, weights: np.ndarray) -> np.ndarray:
        """float64 ``[A, K]`` weighted count of non-ignored ground truth (exact integers)."""
        m = self.m
        a_k = len(AREA_RANGES) * m.num_classes
        counts = np.bincount(m.gt_key, weights=weights[m.gt_img] * m.gt_count, minlength=a_k)
        return counts.reshape(len(AREA_RANGES), m.num_classes)

    def curves(
        self, weights: np.ndarray, det_weights: np.ndarray, npig: np.ndarray, a: int, max_dets: tuple[int, ...] = ()
    ) -> tuple[CocoCurves, dict[int, np.ndarray]]:
        """Precision and recall of area range ``a`` at 100 detections, plus recall at
        each of ``max_dets`` (fewer detections per image and class).

        Args:
            weights: ``[I]`` how many times each image counts (0 = not in the subset).
            det_weights: ``weights[det_img]`` (shared by the area ranges).
            npig: :meth:`npig` of ``weights``.
        """
        ev = self._areas[a]
        k_num, t_num, r_num = self.m.num_classes, len(IOU_THRS), len(REC_THRS)
        n_ref = npig[a]
        # TPs of left-out images change neither tp nor fp (cocoapi never sees them): drop
        tp_w = np.take(weights, ev.tp_img)
        keep = np.flatnonzero(tp_w.astype(bool))
        tp_w, tp_row = tp_w[keep], ev.tp_row[keep]
        row_start = np.searchsorted(keep, ev.row_start)
        tp_cum0 = _cumsum0(tp_w)
        tp = tp_cum0[1:] - tp_cum0[row_start[tp_row]]
        cnt0 = _cumsum0(det_weights if ev.in_pos is None else det_weights[ev.in_pos])
        if ev.m_pos is None:
            matched = tp
        else:
            m_cum0 = _cumsum0(det_weights[ev.m_pos])
            matched = m_cum0[ev.m_idx[keep]] - m_cum0[ev.m_row_base[keep]]
        fp = cnt0[ev.cnt_idx[keep]] - cnt0[ev.cnt_base[keep]] - matched
        tp_f = tp.astype(np.float64)
        pr = tp_f / (fp + tp_f + _EPS)

        # smallest TP count whose recall tp / npig reaches each threshold, in float64 as
        # cocoapi computes it: searchsorted(rc, recThrs, 'left') on exact integers
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.maximum(np.ceil(REC_THRS[None, :] * n_ref[:, None]) - 2, 0)
            for _ in range(4):
                need += (need / n_ref[:, None]) < REC_THRS[None, :]
        rows = np.arange(t_num * k_num, dtype=np.int64)
        query = (rows * _ROW_STRIDE)[:, None] + np.tile(need.astype(np.int64), (t_num, 1))
        first = np.searchsorted(tp_row * _ROW_STRIDE + tp, query.ravel(), side="left")

        # precision envelope sampled at ``first``: the max over each row's TPs from there
        starts = np.concatenate((first.reshape(t_num * k_num, r_num), row_start[1:, None]), axis=1).ravel()
        pr_ext = np.append(pr, 0.0)
        seg_max = np.maximum.reduceat(pr_ext, starts)
        nonempty = starts < np.append(starts[1:], len(pr_ext))
        seg_max = np.where(nonempty, seg_max, 0.0).reshape(t_num * k_num, r_num + 1)[:, :r_num]
        q = np.maximum.accumulate(seg_max[:, ::-1], axis=1)[:, ::-1].reshape(t_num, k_num, r_num)
        defined = n_ref > 0
        precision = np.where(defined[None, :, None], q, -1.0).transpose(0, 2, 1)

        row_tp = tp_cum0[row_start[1:]] - tp_cum0[row_start[:-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(defined[None, :], row_tp.reshape(t_num, k_num) / n_ref[None, :], -1.0)
            extra = {}
            for md in max_dets:
                hits = np.bincount(tp_row, weights=tp_w * (ev.tp_rank[keep] < md), minlength=t_num * k_num)
                extra[md] = np.where(defined[None, :], hits.reshape(t_num, k_num) / n_ref[None, :], -1.0)
        return CocoCurves(precision=precision, recall=recall), extra

    def det_weights(self, weights: np.ndarray) -> np.ndarray:
        """``weights[det_img]`` in the narrowest integer type whose prefix sums cannot
        overflow (int32 halves the memory traffic of this, the one pass over every
        detection that each subset needs)."""
        total = int(weights.max(initial=0)) * len(self.m.det_img)
        dtype = np.int32 if total < np.iinfo(np.int32).max else np.int64
        return np.take(weights.astype(dtype, copy=False), self.m.det_img)


def summarize(s: np.ndarray) -> float:
    """cocoapi ``_summarize``: mean of the defined entries, -1 when there are none."""
    defined = s[s > -1]
    return float(np.mean(defined)) if len(defined) else -1.0


def class_ap(precision: np.ndarray) -> np.ndarray:
    """float64 ``[K]`` AP@[.5:.95] per class from ``precision [T, R, K]``; NaN if undefined.

    A class's entries are all -1 (no non-ignored ground truth) or all defined.
    """
    per_class = np.ascontiguousarray(precision.transpose(2, 0, 1)).reshape(precision.shape[2], -1)
    return np.where(per_class[:, 0] > -1, per_class.mean(axis=1), np.nan)
