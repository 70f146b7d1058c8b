"""The `fundus2video` command line: parses, validates, calls library functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import Fundus2VideoError

app = typer.Typer(
    name="fundus2video",
    help="Retinal multimodal retrieval: CF photos and FFA videos in one search engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("fundus2video")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _fail(error: Exception) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def phantom(
    out: Annotated[Path, typer.Argument(help="Folder to create (must not exist).")],
    cases: Annotated[int, typer.Option(min=1, help="Number of eye-visits.")] = 64,
    size: Annotated[int, typer.Option(min=32, max=2048, help="Image side in pixels.")] = 128,
    frames: Annotated[int, typer.Option(min=2, max=512, help="FFA frames per video.")] = 16,
    seed: Annotated[int, typer.Option(help="Cohort seed; case i depends on (seed, i) only.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Parallel processes.")] = 1,
    preview: Annotated[
        Path | None, typer.Option(help="Also write a contact sheet PNG (one case per diagnosis).")
    ] = None,
):
    """Write a procedural retinal phantom cohort of paired CF photos and FFA videos."""
    from .phantom import write_phantom_cohort, write_preview

    try:
        write_phantom_cohort(out, cases=cases, size=size, frames=frames, seed=seed, workers=workers)
    except (FileExistsError, ValueError) as e:
        raise _fail(e) from e
    typer.echo(f"wrote {cases} cases to {out}")
    if preview is not None:
        write_preview(preview, seed=seed, size=size, frames=frames)
        typer.echo(f"preview: {preview}")


@app.command()
def ingest(
    manifest: Annotated[Path, typer.Argument(help="CSV with case_id, cf_path, ffa_path, ...")],
    out: Annotated[Path, typer.Argument(help="Cohort folder to create (must not exist).")],
    skip_bad: Annotated[
        bool, typer.Option(help="Write the good rows and skipped.csv instead of failing.")
    ] = False,
    allow_outside: Annotated[
        bool, typer.Option(help="Allow media paths outside the manifest's folder.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the patient-level split when none given.")] = 0,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse larger images/frames.")
    ] = 50_000_000,
):
    """Validate a user manifest and build a cohort from it (nothing written if a row is bad)."""
    from .ingest import ingest as ingest_manifest

    try:
        result = ingest_manifest(
            manifest,
            out,
            skip_bad=skip_bad,
            allow_outside=allow_outside,
            seed=seed,
            max_pixels=max_pixels,
        )
    except (Fundus2VideoError, FileExistsError) as e:
        raise _fail(e) from e
    typer.echo(f"wrote {result.written} cases to {result.cohort}")
    if result.skipped:
        typer.echo(
            f"skipped {len(result.skipped)} row(s), listed in {result.cohort / 'skipped.csv'}"
        )


@app.command()
def info(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Summarise a cohort: counts by diagnosis, eye and split; frame counts; sizes."""
    from .cohort import Cohort
    from .info import cohort_summary, format_summary

    try:
        summary = cohort_summary(Cohort.open(cohort), progress=sys.stderr.isatty())
    except Fundus2VideoError as e:
        raise _fail(e) from e
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps what it builds.")] = Path(
        ".demo"
    ),
    cases: Annotated[int, typer.Option(min=8, help="Phantom cases.")] = 128,
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 0,
):
    """Build (once; later runs reuse it) a phantom cohort, then summarise it and write its preview."""
    from .cohort import Cohort
    from .info import cohort_summary, format_summary
    from .phantom import write_phantom_cohort, write_preview

    cohort_dir, preview = workdir / "cohort", workdir / "preview.png"
    if cohort_dir.exists():
        typer.echo(f"reusing {cohort_dir}")
    else:
        write_phantom_cohort(cohort_dir, cases=cases, size=128, frames=16, seed=seed, workers=2)
    if not preview.exists():
        write_preview(preview, seed=seed, size=128, frames=16)
    typer.echo(format_summary(cohort_summary(Cohort.open(cohort_dir), progress=False)))
    typer.echo(f"preview  {preview}")
