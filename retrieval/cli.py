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
    """Build a phantom cohort (once; later runs reuse it), summarise it, write its preview."""
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


def _parse_times(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"--times must be comma-separated seconds, got {text!r}") from e


@app.command()
def train(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder (its train split is used).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    scale: Annotated[str, typer.Option(help="Model scale: tiny or paper.")] = "tiny",
    minutes: Annotated[float | None, typer.Option(min=0.01, help="Wall-clock budget.")] = None,
    iters: Annotated[int | None, typer.Option(min=0, help="Iteration budget.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    variant: Annotated[
        str, typer.Option(help="full, or an ablation: no-knowledge-mask, per-frame.")
    ] = "full",
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    vgg_weights: Annotated[
        Path | None, typer.Option(help="Local VGG19 state dict: enables the perceptual loss.")
    ] = None,
):
    """Train the Fundus2Video generator (a progress bar shows the losses)."""
    from encoder import EncoderError, list_scales

    from .generation import VARIANTS, train_run

    if scale not in list_scales():
        raise typer.BadParameter(f"--scale must be one of {list_scales()}, got {scale!r}")
    if variant not in VARIANTS:
        raise typer.BadParameter(f"--variant must be one of {list(VARIANTS)}, got {variant!r}")
    if minutes is None and iters is None:
        raise typer.BadParameter("give --minutes or --iters")
    try:
        summary = train_run(
            cohort, out, scale=scale, minutes=minutes, iters=iters, resume=resume,
            variant=variant, batch_size=batch_size, seed=seed, vgg_weights=vgg_weights,
        )  # fmt: skip
    except (Fundus2VideoError, EncoderError, FileExistsError, ValueError) as e:
        raise _fail(e) from e
    typer.echo(
        f"{summary.run_dir}: {summary.iterations} iterations in {summary.elapsed_s / 60:.1f} min "
        f"(stopped by {summary.stop_reason})"
    )


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    cf_image: Annotated[Path, typer.Argument(help="Colour fundus photo.")],
    out: Annotated[Path, typer.Option("--out", help="MP4 to write.")],
    times: Annotated[
        str | None,
        typer.Option(help="Frame times in seconds, e.g. 0,15,30,60 (default: the run's)."),
    ] = None,
):
    """Synthesize an FFA video from a CF photo (every frame is marked SYNTHETIC)."""
    from encoder import EncoderError

    from .generation import generate_video
    from .media_write import write_mp4

    try:
        frames, used = generate_video(run, cf_image, times_s=_parse_times(times))
    except (Fundus2VideoError, EncoderError, ValueError) as e:
        raise _fail(e) from e
    write_mp4(out, frames)
    typer.echo(
        f"wrote {len(frames)} synthetic frames at {', '.join(f'{t:g}' for t in used)} s to {out}"
    )


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder of the model to evaluate.")],
    cohort: Annotated[Path, typer.Argument(help="Cohort folder.")],
    out: Annotated[Path, typer.Option("--out", help="JSON report to write.")],
    split: Annotated[str, typer.Option(help="Held-out split.")] = "test",
    compare: Annotated[
        list[str] | None, typer.Option(help="NAME=RUN of another run (e.g. an ablation); repeat.")
    ] = None,
    i3d: Annotated[
        Path | None,
        typer.Option(help="Local I3D TorchScript file: report FVD instead of fvd_proxy."),
    ] = None,
):
    """Generation metrics on held-out patients, with baselines and any compared runs."""
    from encoder import EncoderError

    from .generation import evaluate_runs, generation_table, write_report

    runs: dict[str, Path] = {"model": run}
    for item in compare or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--compare must be NAME=RUN, got {item!r}")
        runs[name] = Path(path)
    try:
        report = evaluate_runs(runs, cohort, split=split, i3d_path=i3d)
    except (Fundus2VideoError, EncoderError, ValueError) as e:
        raise _fail(e) from e
    write_report(report, out)
    typer.echo(generation_table(report))
    typer.echo(f"report: {out}")
