"""Group balance: per building, main meter(s) against the sum of the sub-meters.

Members come from the site registry (a building is a registry fact; devices learnt from
readings have none). Each member's readings are averaged per `window_s` bucket; a bucket
is judged once the watermark reaches its end plus one more window (`GRACE` windows), so
members whose readings straggle a little still count; readings arriving after that are
not counted. A bucket is judged only if every member of the building sent something in
it. Several mains in a building are summed and the alert belongs to the first by id.

Judged buckets are points at the bucket's end for the shared life cycle: an imbalance
over max(`tolerance_pct` % of |main|, `min_abs`) is the condition, within it the reset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.detectors.base import Detector, Meta, Site
from rules.detectors.buckets import OpenBuckets, bucket_end, fixed_parts
from rules.lifecycle import Array, Emitted, level
from rules.model import GroupRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

GRACE = 1.0
MAIN, SUB = 1, 2


class GroupDetector(Detector):
    rule: GroupRule

    def __init__(self, rule: GroupRule, site: Site) -> None:
        super().__init__(rule, site)
        empty = np.zeros(0, dtype=np.int64)
        self.buckets = OpenBuckets()
        # closed per-device bucket means waiting for the building's verdict
        self.p_dev, self.p_b = empty, empty
        self.p_mean = np.zeros(0)
        self._members_for = -1

    def _members(self) -> None:
        """Roles, building numbers and the alerting main, from the registry (cached)."""
        if self._members_for == len(self.site):
            return
        infos = self.site.infos
        n = len(infos)
        registered = np.array(self.site.registered, dtype=np.bool_)
        has_building = np.array([i.building is not None for i in infos], dtype=np.bool_)
        main = self.site.mask(self.rule.main) & registered & has_building
        sub = self.site.mask(self.rule.match) & registered & has_building & ~main
        self.role = np.where(main, MAIN, np.where(sub, SUB, 0)).astype(np.int64)
        names = sorted({i.building for i, r in zip(infos, self.role, strict=True)
                        if r and i.building is not None})
        number = {name: k for k, name in enumerate(names)}
        self.building = np.array([number.get(i.building or "", -1) if self.role[d] else -1
                                  for d, i in enumerate(infos)], dtype=np.int64)
        self.members = np.bincount(self.building[self.role > 0], minlength=len(names))
        self.alerting = np.full(len(names), -1, dtype=np.int64)
        for d in sorted(np.flatnonzero(self.role == MAIN).tolist(),
                        key=lambda d: infos[d].device_id, reverse=True):
            self.alerting[self.building[d]] = d
        self.member_mask = self.role > 0
        self._members_for = n

    def resize(self, size: int) -> None:
        super().resize(size)
        self.buckets.resize(size)

    def process(self, batch: Batch) -> list[Emitted]:
        self._members()
        rule = self.rule
        w = rule.window_s
        grace = GRACE * w
        sel = batch.select(("group", rule.main, rule.match), self.member_mask, rule.metric)
        closed = self.buckets.collect(sel.dev, sel.ts, fixed_parts(sel, rule.metric), sel.wm, w,
                                      batch.wm_end, grace, shared=sel.derived)
        # per-device means wait until the whole building's bucket is due
        if len(closed.dev):
            self.p_dev = np.concatenate([self.p_dev, closed.dev])
            self.p_b = np.concatenate([self.p_b, closed.b])
            self.p_mean = np.concatenate([self.p_mean, closed.mean])
        p_dev, p_b, p_mean = self.p_dev, self.p_b, self.p_mean
        if not len(p_b) or batch.wm_end < (int(p_b.min()) + 1) * w + grace:
            return []
        due = batch.wm_end >= bucket_end(p_b, w) + grace
        self.p_dev, self.p_b, self.p_mean = p_dev[~due], p_b[~due], p_mean[~due]
        if not due.any():
            return []
        return self._judge(p_dev[due], p_b[due], p_mean[due])

    def _judge(self, dev: I64, b: I64, mean: F64) -> list[Emitted]:
        """Per (building, bucket): mains' and subs' means summed in device order."""
        rule = self.rule
        member = self.role[dev] > 0  # the registry may have changed since a restore
        dev, b, mean = dev[member], b[member], mean[member]
        if not len(dev):
            return []
        home = self.building[dev]
        role = self.role[dev]
        order = np.lexsort((dev, role, b, home))
        dev, b, mean, home, role = dev[order], b[order], mean[order], home[order], role[order]
        group_first = np.append(True, (home[1:] != home[:-1]) | (b[1:] != b[:-1]))
        starts = np.flatnonzero(group_first)
        count = np.diff(np.append(starts, len(dev)))
        role_first = group_first.copy()
        role_first[1:] |= role[1:] != role[:-1]
        role_starts = np.flatnonzero(role_first)
        role_sums = np.add.reduceat(mean, role_starts)
        group_of_run = np.cumsum(group_first)[role_starts] - 1
        main = np.zeros(len(starts))
        subs = np.zeros(len(starts))
        is_main = role[role_starts] == MAIN
        main[group_of_run[is_main]] = role_sums[is_main]
        subs[group_of_run[~is_main]] = role_sums[~is_main]
        gh = home[starts]
        owner = self.alerting[gh]
        ok = np.flatnonzero((count == self.members[gh]) & (owner >= 0))
        if not len(ok):
            return []
        main, subs = main[ok], subs[ok]
        gap = main - subs
        limit = np.maximum(rule.tolerance_pct / 100.0 * np.abs(main), rule.min_abs)
        pts_dev, pts_ts = owner[ok], bucket_end(b[starts][ok], rule.window_s)
        order = np.lexsort((pts_ts, pts_dev))
        detail: list[Mapping[str, Any] | None] = [
            {"main": m, "subs": x, "difference": g}
            for m, x, g in zip(main[order].tolist(), subs[order].tolist(),
                               gap[order].tolist(), strict=True)]
        off = np.abs(gap[order]) > limit[order]
        return level(self.life, pts_dev[order], pts_ts[order], off, ~off, rule.for_s,
                     main[order], detail)

    def dump(self) -> tuple[dict[str, Array], Meta]:
        arrays, meta = super().dump()
        arrays.update(self.buckets.dump("bucket.", len(self.site)))
        arrays.update({"part.dev": self.p_dev, "part.b": self.p_b, "part.mean": self.p_mean})
        return arrays, meta

    def load(self, arrays: Mapping[str, Array], meta: Meta) -> None:
        super().load(arrays, meta)
        self.buckets.load("bucket.", arrays)
        try:
            parts = [arrays[f"part.{k}"] for k in ("dev", "b", "mean")]
        except KeyError as exc:
            raise ValueError("snapshot lacks the group partial buckets") from exc
        if len({len(p) for p in parts}) != 1 or (len(parts[0]) and (
                parts[0].min() < 0 or parts[0].max() >= len(self.site))):
            raise ValueError("group partial buckets are inconsistent")
        self.p_dev = parts[0].astype(np.int64)
        self.p_b = parts[1].astype(np.int64)
        self.p_mean = parts[2].astype(np.float64)
