"""Scoring against its physical limit: our predict path and reason codes vs raw LightGBM (DESIGN §5).

The functions here run inside the ``score`` step of ``benchmarks/run.py`` on the very candidates it
scored (same process, same feature matrices), after that step's peak RSS was recorded:

- ``predict_limits``: per offer type, ``OfferModel.predict_proba`` on the scoring frame (string
  categoricals → LightGBM categoricals, booster, calibration) vs raw ``Booster.predict`` on a
  prebuilt float64 numpy matrix of the same rows (categorical codes, NaN for unseen/missing): the
  C++ tree walk alone. Predictions are checked to agree.
- ``ReasonProbe`` (timers inside ``decide``) / ``reason_cost`` (a separate run):
  ``OfferModel.contributions`` (``pred_contrib``) + ``ml.reasons.reason_codes`` for the rows that
  were published, as DESIGN §5.6 asks (not for every candidate).

Run alone on a run kept with ``--keep`` (re-runs the score step, which does both)::

    python benchmarks/run.py --customers 100000 --keep          # once
    python benchmarks/bench_score.py --out var/bench            # scoring ratios only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _timed(fn, repeat: int = 1):
    """(best seconds over ``repeat`` runs, last result): the best run is the least disturbed one."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def raw_matrix(model, frame: pd.DataFrame) -> np.ndarray:
    """The booster's input as a plain float64 matrix: categorical codes (NaN if missing), numbers as is."""
    X = model.to_booster_input(frame)
    cols = []
    for c in X.columns:
        s = X[c]
        if isinstance(s.dtype, pd.CategoricalDtype):
            codes = s.cat.codes.to_numpy().astype("float64")
            codes[codes < 0] = np.nan
            cols.append(codes)
        else:
            cols.append(s.to_numpy(dtype="float64"))
    return np.ascontiguousarray(np.column_stack(cols)) if cols else np.zeros((len(frame), 0))


def predict_limits(models: dict, scored: dict[str, pd.DataFrame], repeat: int = 2) -> dict:
    """Per type and in total: rows/s of ``predict_proba`` (ours) vs raw ``Booster.predict`` (numpy)."""
    out: dict = {"types": {}}
    tot = {"rows": 0, "ours_s": 0.0, "raw_s": 0.0, "matrix_s": 0.0}
    for offer_type, model in models.items():
        frame = scored[offer_type][list(model.feature_names)]
        if not len(frame):
            continue
        booster, it = model.booster, model.booster.best_iteration or None
        ours_s, p_ours = _timed(lambda f=frame, m=model: m.predict_proba(f), repeat)
        matrix_s, X = _timed(lambda f=frame, m=model: raw_matrix(m, f))
        raw_s, p_raw = _timed(lambda X=X, b=booster, it=it: b.predict(X, num_iteration=it), repeat)
        agree = bool(np.allclose(model.calibrator(p_raw), p_ours, rtol=1e-9, atol=1e-12))
        out["types"][offer_type] = {
            "rows": len(frame),
            "features": frame.shape[1],
            "trees": int(it or booster.num_trees()),
            "predict_proba_s": ours_s,
            "raw_booster_predict_s": raw_s,
            "raw_matrix_build_s": matrix_s,
            "predict_proba_rows_per_s": len(frame) / ours_s,
            "raw_rows_per_s": len(frame) / raw_s,
            "ratio": raw_s / ours_s,
            "predictions_agree": agree,
        }
        tot["rows"] += len(frame)
        tot["ours_s"] += ours_s
        tot["raw_s"] += raw_s
        tot["matrix_s"] += matrix_s
    if tot["rows"]:
        out.update(
            {
                "rows": tot["rows"],
                "predict_proba_s": tot["ours_s"],
                "raw_booster_predict_s": tot["raw_s"],
                "raw_matrix_build_s": tot["matrix_s"],
                "predict_proba_rows_per_s": tot["rows"] / tot["ours_s"],
                "raw_rows_per_s": tot["rows"] / tot["raw_s"],
                "ratio": tot["raw_s"] / tot["ours_s"],
            }
        )
    return out


def chosen_rows(scored: dict[str, pd.DataFrame], offers: pd.DataFrame, offer_type: str) -> pd.DataFrame:
    """The scored candidate rows (features included) behind the offers of one type."""
    keys = offers.loc[offers["offer_type"] == offer_type, ["customer_id", "category", "product_id"]]
    cand = scored[offer_type]
    return keys.astype("string").merge(
        cand, on=["customer_id", "category", "product_id"], how="inner", validate="one_to_one"
    )


class ReasonProbe:
    """Times the reason-code work inside ``ml.score.decide`` itself, so it is not done twice.

    While active, each model's ``contributions`` and ``ml.reasons.reason_codes`` (which ``decide``
    imports at call time) are wrapped with timers; ``result()`` has the same keys as ``reason_cost``.
    """

    def __init__(self, models: dict):
        self.models = models
        self.types: dict[str, dict] = {
            t: {"rows": 0, "contributions_s": 0.0, "reason_codes_s": 0.0} for t in models
        }
        self._current: str | None = None

    def __enter__(self) -> ReasonProbe:
        import ml.reasons

        self._reason_codes = original = ml.reasons.reason_codes

        def reason_codes(contrib, values, k: int = 3):
            t0 = time.perf_counter()
            out = original(contrib, values, k)
            if self._current is not None:
                self.types[self._current]["reason_codes_s"] += time.perf_counter() - t0
            return out

        ml.reasons.reason_codes = reason_codes
        for offer_type, model in self.models.items():
            bound = model.contributions

            def contributions(df, bound=bound, offer_type=offer_type):
                t0 = time.perf_counter()
                out = bound(df)
                self.types[offer_type]["contributions_s"] += time.perf_counter() - t0
                self.types[offer_type]["rows"] += len(df)
                self._current = offer_type
                return out

            model.contributions = contributions  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        import ml.reasons

        ml.reasons.reason_codes = self._reason_codes
        for model in self.models.values():
            vars(model).pop("contributions", None)

    def result(self) -> dict:
        out: dict = {"types": {}}
        for t, v in self.types.items():
            if v["rows"]:
                seconds = v["contributions_s"] + v["reason_codes_s"]
                out["types"][t] = {**v, "rows_per_s": v["rows"] / seconds}
        rows = sum(v["rows"] for v in self.types.values())
        contrib = sum(v["contributions_s"] for v in self.types.values())
        codes = sum(v["reason_codes_s"] for v in self.types.values())
        if rows:
            out.update(
                {
                    "rows": rows,
                    "contributions_s": contrib,
                    "reason_codes_s": codes,
                    "seconds": contrib + codes,
                    "rows_per_s": rows / (contrib + codes),
                    "contributions_rows_per_s": rows / contrib,
                    "reason_codes_rows_per_s": rows / codes,
                    "measured": "inside decide",
                }
            )
        return out


def reason_cost(models: dict, scored: dict[str, pd.DataFrame], offers: pd.DataFrame) -> dict:
    """rows/s of contributions + reason_codes for the published rows (control rows included)."""
    from ml.reasons import reason_codes

    out: dict = {"types": {}}
    rows = 0
    contrib_total = codes_total = 0.0
    for offer_type, model in models.items():
        chosen = chosen_rows(scored, offers, offer_type)
        if not len(chosen):
            continue
        feats = chosen[list(model.feature_names)]
        contrib_s, contrib = _timed(lambda f=feats, m=model: m.contributions(f))
        values = feats.assign(category=chosen["category"].to_numpy())
        codes_s, _ = _timed(
            lambda c=contrib, v=values: reason_codes(c.reset_index(drop=True), v.reset_index(drop=True))
        )
        out["types"][offer_type] = {
            "rows": len(chosen),
            "contributions_s": contrib_s,
            "reason_codes_s": codes_s,
            "rows_per_s": len(chosen) / (contrib_s + codes_s),
        }
        rows += len(chosen)
        contrib_total += contrib_s
        codes_total += codes_s
    if rows:
        out.update(
            {
                "rows": rows,
                "contributions_s": contrib_total,
                "reason_codes_s": codes_total,
                "seconds": contrib_total + codes_total,
                "rows_per_s": rows / (contrib_total + codes_total),
                "contributions_rows_per_s": rows / contrib_total,
                "reason_codes_rows_per_s": rows / codes_total,
                "offers_matched": rows,
                "offers": len(offers),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("var/bench"),
        help="the folder of a `run.py --keep` run (its validated shop and MLflow store)",
    )
    args = p.parse_args(argv)
    import run  # benchmarks/ is sys.path[0] when this file runs as a script

    return run.main(["--out", str(args.out), "--steps", "score", "--keep"])


if __name__ == "__main__":
    raise SystemExit(main())
