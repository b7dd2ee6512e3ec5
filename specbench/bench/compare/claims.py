"""The papers' ordering claims (e.g. tau(HASS) > tau(EAGLE-2)) checked on the runs of one compare."""

from __future__ import annotations

from .runs import Run


def check_claims(runs: list[Run], claims: list[dict]) -> list[dict]:
    """Ordering claims (e.g. tau(hass) > tau(eagle2)) on every (target, dataset, T) holding both methods."""
    by_setting: dict[tuple, dict[str, Run]] = {}
    for r in runs:
        by_setting.setdefault(r.setting_key(), {}).setdefault(r.method, r)
    out = []
    for cl in claims:
        for key, methods in sorted(by_setting.items(), key=lambda kv: str(kv[0])):
            a, b = methods.get(cl["better"]), methods.get(cl["worse"])
            if a is None or b is None:
                continue
            if cl.get("datasets") and key[1] not in cl["datasets"]:
                continue
            if cl.get("temperatures") is not None and key[2] not in [float(t) for t in cl["temperatures"]]:
                continue
            va, vb = a.value(cl["metric"]), b.value(cl["metric"])
            holds = va is not None and vb is not None and va > vb
            out.append({"claim": cl, "target": key[0], "dataset": key[1], "temperature": key[2],
                        "better": va, "worse": vb, "holds": holds})
    return out
