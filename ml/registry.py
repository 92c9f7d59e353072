"""MLflow tracking setup, the model registry, the promotion gate and the alias audit trail.

Registered models are ``offerflow-<type>``; every new version gets alias ``challenger`` and only the
gate (or a person, with a reason) moves ``champion``. MLflow keeps no history of aliases, so every move
is also written as a tiny run in the experiment ``offerflow/registry`` (tags only: model, alias,
from/to version, UTC time, reason, actor). Runs and tags live in the backend store, so the trail works
on SQLite, PostgreSQL or a tracking server alike, and "which version was champion on date D" and
"roll back to the previous champion" are answered from it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import math
import os
from dataclasses import dataclass, field

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ml import config
from ml.config import GATE, GateConfig
from ml.contract import OFFER_TYPES
from ml.model import OfferModel

CHAMPION = "champion"
CHALLENGER = "challenger"
REGISTRY_EXPERIMENT = "offerflow/registry"
KINDS = ("register", "gate", "promote", "rollback")


def model_name(offer_type: str) -> str:
    if offer_type not in OFFER_TYPES:
        raise ValueError(f"unknown offer type {offer_type!r}; choose from {list(OFFER_TYPES)}")
    return f"offerflow-{offer_type}"


def experiment_name(offer_type: str) -> str:
    return f"offerflow/{offer_type}"


# -- tracking setup ------------------------------------------------------------------------------------
def use_tracking() -> MlflowClient:
    """Point MLflow at ``config.tracking_uri()`` (env or ./var SQLite) and return a client for it."""
    uri = config.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _local_store(uri: str) -> bool:
    """A backend store we write artifacts for ourselves (no server deciding where they go)."""
    return not uri.startswith(("http://", "https://", "databricks"))


def ensure_experiment(name: str) -> str:
    """Experiment id for ``name``, created with artifacts under ``config.artifact_root()`` for local stores.

    Without an explicit location MLflow would put artifacts in ./mlruns of the current directory, i.e.
    outside ./var (and with a PostgreSQL backend, wherever the process happens to run).
    """
    client = use_tracking()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _local_store(config.tracking_uri()):
        location = f"{config.artifact_root()}/{name.replace('/', '-')}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another task
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_context_tags(extra: dict | None = None) -> dict[str, str]:
    """git commit and, when Airflow runs us, dag_id/run_id: the provenance tags of every run."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    tags = {"git_commit": commit or "unknown"}
    for key, env in (("airflow_dag_id", "AIRFLOW_CTX_DAG_ID"), ("airflow_run_id", "AIRFLOW_CTX_DAG_RUN_ID")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    if os.environ.get("OFFERFLOW_ACTOR"):
        return os.environ["OFFERFLOW_ACTOR"]
    if os.environ.get("AIRFLOW_CTX_DAG_ID"):
        return f"airflow:{os.environ['AIRFLOW_CTX_DAG_ID']}/{os.environ.get('AIRFLOW_CTX_DAG_RUN_ID', '')}"
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- aliases and their history -------------------------------------------------------------------------
def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_version(offer_type: str) -> str | None:
    return _alias_version(use_tracking(), model_name(offer_type), CHAMPION)


def challenger_version(offer_type: str) -> str | None:
    return _alias_version(use_tracking(), model_name(offer_type), CHALLENGER)


def move_alias(offer_type: str, alias: str, version: str, reason: str, kind: str,
               actor: str | None = None) -> str | None:
    """Set ``alias`` to ``version`` and record the move; returns the version that held it before."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    client = use_tracking()
    name = model_name(offer_type)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ValueError(f"{name} has no version {version!r}") from None
    before = _alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, str(version))
    moved_at = dt.datetime.now(dt.UTC)
    exp_id = ensure_experiment(REGISTRY_EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"{name} {alias}: {before or '-'} -> {version}", tags={
        "model": name, "offer_type": offer_type, "alias": alias, "from_version": before or "",
        "to_version": str(version), "moved_at": moved_at.isoformat(timespec="microseconds"),
        "reason": reason[:4000], "actor": _actor(actor), "kind": kind,
    })
    client.set_terminated(run.info.run_id)
    return before


HISTORY_COLUMNS = ["moved_at", "model", "alias", "from_version", "to_version", "kind", "reason", "actor"]


def alias_history(offer_type: str, alias: str | None = None) -> pd.DataFrame:
    """Every recorded alias move of one model, oldest first (``moved_at`` as UTC timestamps)."""
    use_tracking()
    client = MlflowClient()
    exp = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
    if exp is None:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    filt = f"tags.model = '{model_name(offer_type)}'"
    if alias:
        if alias not in (CHAMPION, CHALLENGER):
            raise ValueError(f"alias must be {CHAMPION!r} or {CHALLENGER!r}")
        filt += f" and tags.alias = '{alias}'"
    rows, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000, page_token=token)
        rows += [{**{c: r.data.tags.get(c, "") for c in HISTORY_COLUMNS}, "_start": r.info.start_time}
                 for r in page]
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows, columns=[*HISTORY_COLUMNS, "_start"])
    df["moved_at"] = pd.to_datetime(df["moved_at"], utc=True)
    return (df.sort_values(["moved_at", "_start"], kind="stable").drop(columns="_start")
            .reset_index(drop=True))


def alias_history_text(offer_type: str) -> str:
    df = alias_history(offer_type)
    if df.empty:
        return f"{model_name(offer_type)}: no alias moves recorded"
    lines = [f"{model_name(offer_type)}: {len(df)} alias move(s), oldest first"]
    for r in df.itertuples(index=False):
        lines.append(f"  {r.moved_at:%Y-%m-%d %H:%M:%S} UTC  {r.alias:<10} v{r.from_version or '-'} -> "
                     f"v{r.to_version}  [{r.kind} by {r.actor}] {r.reason}")
    return "\n".join(lines)


def _to_utc(when: dt.date | dt.datetime | str | pd.Timestamp) -> pd.Timestamp:
    """A date means the end of that UTC day: the version that was live at the close of D."""
    if isinstance(when, dt.date) and not isinstance(when, dt.datetime):
        return pd.Timestamp(when, tz="UTC") + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    ts = pd.Timestamp(when)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def champion_at(offer_type: str, when: dt.date | dt.datetime | str | pd.Timestamp) -> str | None:
    """The champion version at ``when`` (a date = end of that UTC day), or None if there was none yet."""
    hist = alias_history(offer_type, CHAMPION)
    past = hist[hist["moved_at"] <= _to_utc(when)]
    return str(past["to_version"].iloc[-1]) if len(past) else None


def _champion_stack(offer_type: str) -> list[str]:
    """Replay the champion moves: a rollback pops, anything else pushes. Top = current champion."""
    stack: list[str] = []
    for r in alias_history(offer_type, CHAMPION).itertuples(index=False):
        if r.kind == "rollback" and len(stack) >= 2 and stack[-2] == r.to_version:
            stack.pop()
        elif not stack or stack[-1] != r.to_version:
            stack.append(r.to_version)
    return stack


def promote(offer_type: str, version: str, reason: str, actor: str | None = None,
            kind: str = "promote") -> str:
    """Make ``version`` champion (no gate: a person decided, the reason is recorded)."""
    name = model_name(offer_type)
    current = champion_version(offer_type)
    if current == str(version):
        return f"{name}: v{version} is already champion; nothing moved"
    move_alias(offer_type, CHAMPION, str(version), reason, kind=kind, actor=actor)
    return f"{name}: champion v{current or '-'} -> v{version} ({reason})"


def rollback(offer_type: str, reason: str, actor: str | None = None) -> str:
    """Move champion back to the version that held it before the current one (repeatable: 3 → 2 → 1)."""
    name = model_name(offer_type)
    current = champion_version(offer_type)
    stack = _champion_stack(offer_type)
    if current is None or len(stack) < 2 or stack[-1] != current:
        raise ValueError(f"{name}: no previous champion recorded to roll back to "
                         f"(current: v{current or '-'})")
    target = stack[-2]
    move_alias(offer_type, CHAMPION, target, reason, kind="rollback", actor=actor)
    return f"{name}: champion rolled back v{current} -> v{target} ({reason})"


# -- loading -------------------------------------------------------------------------------------------
def load_model_version(offer_type: str, version: str) -> OfferModel:
    """The OfferModel of one registered version (scoring pins versions, so a promote mid-run is harmless)."""
    use_tracking()
    return mlflow.pyfunc.load_model(f"models:/{model_name(offer_type)}/{version}").unwrap_python_model()


def load_champion(offer_type: str) -> tuple[OfferModel, str]:
    """``(OfferModel, version)`` of the current champion, via ``models:/offerflow-<type>@champion``."""
    use_tracking()
    client = MlflowClient()
    name = model_name(offer_type)
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        raise LookupError(f"{name} has no champion yet: run `offerflow train` "
                          "(or `offerflow models promote`)")
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").unwrap_python_model()
    return model, version


def list_models() -> str:
    """One line per offer type: champion and challenger versions and the champion's test metrics."""
    client = use_tracking()
    lines = []
    for offer_type in OFFER_TYPES:
        name = model_name(offer_type)
        try:
            client.get_registered_model(name)
        except MlflowException:
            lines.append(f"{name}: not registered")
            continue
        champ, chall = _alias_version(client, name, CHAMPION), _alias_version(client, name, CHALLENGER)
        line = f"{name}: champion v{champ or '-'}, challenger v{chall or '-'}"
        if champ:
            m = client.get_run(client.get_model_version(name, champ).run_id).data.metrics
            line += (f" | test AUC {m.get('roc_auc', math.nan):.3f} (baseline "
                     f"{m.get('baseline_roc_auc', math.nan):.3f}), "
                     f"top-k hit {m.get('topk_hit_rate', math.nan):.3f}, "
                     f"brier {m.get('brier', math.nan):.4f}, ece {m.get('ece', math.nan):.4f}")
        lines.append(line)
    return "\n".join(lines)


REPORT_METRICS = ("roc_auc", "pr_auc", "lift_at_10", "topk_hit_rate")


def champion_metrics() -> pd.DataFrame:
    """The champions' out-of-time metrics next to the popularity baseline's on the same rows."""
    client = use_tracking()
    rows = []
    for offer_type in OFFER_TYPES:
        name = model_name(offer_type)
        champ = _alias_version(client, name, CHAMPION) if _registered(client, name) else None
        if not champ:
            continue
        run = client.get_run(client.get_model_version(name, champ).run_id)
        m = run.data.metrics
        row = {"offer_type": offer_type, "version": champ, "as_of": run.data.tags.get("as_of", "")}
        for key in REPORT_METRICS:
            row[key], row[f"baseline_{key}"] = m.get(key, math.nan), m.get(f"baseline_{key}", math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_report() -> str:
    """A Markdown table of ``champion_metrics`` (what README shows)."""
    df = champion_metrics()
    if df.empty:
        return "no champion models yet: run `offerflow train` first"
    head = ("| model | as of | ROC AUC (baseline) | PR AUC (baseline) | lift@10% (baseline) "
            "| top-3 hit rate (baseline) |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        cells = [f"{getattr(r, k):.3f} ({getattr(r, 'baseline_' + k):.3f})" for k in REPORT_METRICS]
        lines.append(f"| {r.offer_type} v{r.version} | {r.as_of} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _registered(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


# -- promotion gate ------------------------------------------------------------------------------------
@dataclass
class GateDecision:
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"promoted": self.promoted, "reasons": list(self.reasons), "metrics": dict(self.metrics)}


def _ok(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def decide(metrics: dict, champion_auc: float | None, champion: str | None,
           cfg: GateConfig = GATE) -> tuple[bool, list[str]]:
    """The gate's rules on plain numbers; each reason starts with ``ok:`` or ``fail:``. NaN/missing fails."""
    checks: list[tuple[bool, str]] = []
    auc, base = metrics.get("roc_auc", math.nan), metrics.get("baseline_roc_auc", math.nan)
    checks.append((_ok(auc) and _ok(base) and auc - base > cfg.min_auc_gain_over_baseline,
                   f"AUC {auc:.4f} vs baseline {base:.4f} (must gain > {cfg.min_auc_gain_over_baseline})"))
    brier, ece = metrics.get("brier", math.nan), metrics.get("ece", math.nan)
    checks.append((_ok(brier) and brier <= cfg.max_brier, f"brier {brier:.4f} (bound {cfg.max_brier})"))
    checks.append((_ok(ece) and ece <= cfg.max_ece, f"ece {ece:.4f} (bound {cfg.max_ece})"))
    if champion is None:
        checks.append((True, "no champion yet"))
    elif champion_auc is None or not _ok(champion_auc):
        checks.append((False, f"champion v{champion} could not score the same test rows: promote manually"))
    else:
        checks.append((auc >= champion_auc - cfg.champion_tolerance,
                       f"AUC {auc:.4f} vs champion v{champion} {champion_auc:.4f} on the same rows "
                       f"(tolerance {cfg.champion_tolerance})"))
    return all(ok for ok, _ in checks), [f"{'ok' if ok else 'fail'}: {text}" for ok, text in checks]


def gate(offer_type: str, version: str, cfg: GateConfig = GATE, actor: str | None = None) -> GateDecision:
    """Run the promotion gate for a registered version and move ``champion`` if it passes.

    Reads the version's run: its test metrics and the AUC of the champion it was compared with on the same
    out-of-time rows (``compared_champion_version`` / ``champion_roc_auc``, written at training time so the
    gate can run as its own task without customer-level rows in any artifact). If the champion moved since,
    the comparison is stale and the gate refuses.
    """
    client = use_tracking()
    name = model_name(offer_type)
    mv = client.get_model_version(name, str(version))
    run = client.get_run(mv.run_id)
    metrics = dict(run.data.metrics)
    compared = run.data.tags.get("compared_champion_version") or None
    current = _alias_version(client, name, CHAMPION)
    if current == str(version):
        return GateDecision(True, [f"ok: v{version} is already champion"], metrics)
    champion_auc = metrics.get("champion_roc_auc")
    if current != compared:
        ok, reasons = False, [f"fail: champion is v{current or '-'} now but v{version} was compared with "
                              f"v{compared or '-'}: retrain or promote manually"]
    else:
        ok, reasons = decide(metrics, champion_auc, current, cfg)
    decision = GateDecision(ok, reasons, {k: metrics[k] for k in sorted(metrics)})
    client.set_model_version_tag(name, str(version), "gate", "passed" if ok else "failed")
    client.set_model_version_tag(name, str(version), "gate_reasons", "; ".join(reasons)[:4000])
    if ok:
        move_alias(offer_type, CHAMPION, str(version), "gate: " + "; ".join(reasons), kind="gate",
                   actor=actor)
    return decision

