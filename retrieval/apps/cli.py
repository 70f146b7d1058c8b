"""The `fundus2video` command line: parses, validates, calls library functions.

Errors: the project's own error classes (`retrieval.errors.Fundus2VideoError`,
`encoder.EncoderError`, `index.IndexStoreError`) are a user's bad input — a file, a
folder or a parameter, named in the message — and exit 2 with that one line
(`bad_input`). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from retrieval.errors import Fundus2VideoError

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


def _fail(error: Exception | str) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def project_errors() -> tuple[type[Exception], ...]:
    """The error bases of the three packages (imported here: `encoder` loads torch)."""
    from encoder.errors import EncoderError
    from index.errors import IndexStoreError

    return Fundus2VideoError, EncoderError, IndexStoreError


@contextlib.contextmanager
def bad_input() -> Iterator[None]:
    """Within the block, the project's errors exit 2 with their message; others propagate."""
    try:
        yield
    except Exception as e:
        if isinstance(e, project_errors()):
            raise _fail(e) from e
        raise


def _new_folder(path: Path) -> None:
    """Refuse an output folder that exists (the library would too, with a FileExistsError)."""
    if path.exists():
        raise _fail(f"{path} already exists (choose another output folder)")


@contextlib.contextmanager
def _writing(option: str, path: Path) -> Iterator[None]:
    """An OSError while writing the file the user named is about that file: exit 2."""
    try:
        yield
    except OSError as e:
        raise _fail(f"{option} {path}: cannot write it ({e.strerror or e})") from e


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
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="png: a cohort (CF PNG, FFA MP4, catalog); dicom: Ophthalmic Photography "
            "files for ingest-dicom.",
        ),
    ] = "png",
    aspect: Annotated[str, typer.Option(help="Frame width:height, e.g. 3:2 (black sides).")] = "1",
    fov_deg: Annotated[
        str | None, typer.Option(help="Field of view in degrees, or a range per case: 30-55.")
    ] = None,
    circle: Annotated[
        str | None,
        typer.Option(help="FOV circle diameter / frame height (a range: 0.95-1.1; > 1 cuts it)."),
    ] = None,
    shift: Annotated[
        float, typer.Option(min=0, max=0.25, help="Circle centre offset, up to x frame height.")
    ] = 0.0,
):
    """Write a procedural retinal phantom cohort of paired CF photos and FFA videos."""
    from retrieval.data.phantom import write_phantom_cohort, write_preview
    from retrieval.data.phantom.anatomy import framing_options

    if fmt not in ("png", "dicom"):
        raise _fail(f"--format {fmt!r} is not one of png, dicom")
    try:
        framing = framing_options(aspect, fov_deg, circle, shift)
    except ValueError as e:
        raise _fail(e) from e
    _new_folder(out)
    with bad_input():
        write_phantom_cohort(
            out,
            cases=cases,
            size=size,
            frames=frames,
            seed=seed,
            workers=workers,
            format=fmt,
            **framing,
        )
    typer.echo(f"wrote {cases} cases to {out}")
    if preview is not None:
        with _writing("--preview", preview):
            write_preview(preview, seed=seed, size=size, frames=frames)
        typer.echo(f"preview: {preview}")


@app.command()
def ingest(
    manifest: Annotated[Path, typer.Argument(help="CSV with case_id, cf_path, ffa_path, ...")],
    out: Annotated[Path, typer.Argument(help="Cohort folder to create (must not exist).")],
    skip_bad: Annotated[
        bool, typer.Option(help="Write the good rows and skipped.csv instead of failing.")
    ] = False,
    skip_duplicates: Annotated[
        bool,
        typer.Option(help="Leave out rows whose CF or FFA near-duplicates an earlier row's."),
    ] = False,
    allow_duplicates: Annotated[
        bool, typer.Option(help="Keep near-duplicate rows (they are still listed).")
    ] = False,
    allow_outside: Annotated[
        bool, typer.Option(help="Allow media paths outside the manifest's folder.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the patient-level split when none given.")] = 0,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse larger images/frames.")
    ] = 50_000_000,
    register: Annotated[
        bool,
        typer.Option("--register/--no-register", help="Register each CF photo onto its FFA video."),
    ] = True,
):
    """Validate a user manifest and build a cohort from it (nothing written if a row is bad)."""
    from retrieval.data.ingest import ingest as ingest_manifest

    _new_folder(out)
    with bad_input():
        result = ingest_manifest(
            manifest,
            out,
            skip_bad=skip_bad,
            skip_duplicates=skip_duplicates,
            allow_duplicates=allow_duplicates,
            allow_outside=allow_outside,
            seed=seed,
            max_pixels=max_pixels,
            register=register,
            progress=sys.stderr.isatty(),
        )
    typer.echo(f"wrote {result.written} cases to {result.cohort}")
    for pair in result.duplicates:
        typer.echo(f"near-duplicate {pair.modality}: {pair.a} ~ {pair.b} ({pair.distance:.3f})")
    for line in registration_failures(result.registration_failed):
        typer.echo(line)
    if result.skipped:
        typer.echo(
            f"skipped {len(result.skipped)} row(s), listed in {result.cohort / 'skipped.csv'}"
        )


def registration_failures(failed: dict[str, float]) -> list[str]:
    """Lines naming the cases whose CF↔FFA registration failed (kept unregistered)."""
    if not failed:
        return []
    lines = [f"registration failed (kept unregistered): {len(failed)} case(s)"]
    return lines + [f"  {case_id} (quality {q:.2f})" for case_id, q in failed.items()]


@app.command("register")
def register_command(
    cohort: Annotated[Path, typer.Argument(help="A cohort folder (its catalog is rewritten).")],
    force: Annotated[
        bool, typer.Option(help="Register again the cases already registered or failed.")
    ] = False,
):
    """Register each CF photo of a cohort onto its FFA video, in place (atomic rewrite)."""
    from retrieval.data.registration import register_cohort

    with bad_input():
        result = register_cohort(cohort, force=force, progress=sys.stderr.isatty())
    typer.echo(
        f"{result.cohort}: registered {result.registered}, failed {len(result.failed)}, "
        f"kept {result.kept} as they were"
    )
    for line in registration_failures(result.failed):
        typer.echo(line)


@app.command("ingest-dicom")
def ingest_dicom(
    folder: Annotated[Path, typer.Argument(help="Folder of DICOM files, or a DICOMDIR.")],
    out: Annotated[Path, typer.Argument(help="Cohort folder to create (must not exist).")],
    salt: Annotated[
        str | None,
        typer.Option(envvar="FUNDUS2VIDEO_DICOM_SALT", help="Secret for hashed ids (required)."),
    ] = None,
    assume_interval: Annotated[
        float | None,
        typer.Option(min=0.001, help="Seconds between FFA frames when the DICOM gives no times."),
    ] = None,
    ffa_format: Annotated[
        str, typer.Option(help="mp4, or frames (a folder of PNG frames, lossless).")
    ] = "mp4",
    name: Annotated[str, typer.Option(help="The cohort's `source` value.")] = "dicom",
    skip_bad: Annotated[
        bool, typer.Option(help="Leave out the eyes that cannot be used instead of failing.")
    ] = False,
    allow_burned_in: Annotated[
        bool, typer.Option(help="Accept images marked BurnedInAnnotation YES (checked by you).")
    ] = False,
    register: Annotated[
        bool,
        typer.Option("--register/--no-register", help="Register each CF photo onto its FFA video."),
    ] = True,
    skip_duplicates: Annotated[
        bool, typer.Option(help="Leave out cases whose CF or FFA near-duplicates another's.")
    ] = False,
    allow_duplicates: Annotated[
        bool, typer.Option(help="Keep near-duplicate cases (they are still listed).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the patient-level split.")] = 0,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse larger images/frames.")
    ] = 50_000_000,
):
    """Build a de-identified cohort from DICOM ophthalmic photos and angiograms."""
    from retrieval.data.dicom import ingest_dicom as ingest_dicom_folder

    _new_folder(out)
    with bad_input():
        result = ingest_dicom_folder(
            folder,
            out,
            salt=salt,
            assume_interval=assume_interval,
            ffa_format=ffa_format,
            name=name,
            skip_bad=skip_bad,
            allow_burned_in=allow_burned_in,
            skip_duplicates=skip_duplicates,
            allow_duplicates=allow_duplicates,
            seed=seed,
            max_pixels=max_pixels,
            register=register,
            progress=sys.stderr.isatty(),
        )
    _dicom_report(result)


def _dicom_report(result) -> None:
    """What `ingest-dicom` wrote, found and left out."""
    typer.echo(f"wrote {result.written} cases to {result.cohort}")
    for pair in result.duplicates:
        typer.echo(f"near-duplicate {pair.modality}: {pair.a} ~ {pair.b} ({pair.distance:.3f})")
    for line in registration_failures(result.registration_failed):
        typer.echo(line)
    for problem in result.skipped:
        typer.echo(f"skipped: {problem.message}")


@app.command()
def duplicates(
    folder: Annotated[Path, typer.Argument(help="A cohort folder or an index folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    cf_threshold: Annotated[
        float | None, typer.Option(min=0.0, max=2.0, help="CF distance limit (default: tuned).")
    ] = None,
    ffa_threshold: Annotated[
        float | None, typer.Option(min=0.0, max=2.0, help="FFA distance limit (default: tuned).")
    ] = None,
):
    """List the pairs of cases whose CF photos or FFA videos are near-duplicates."""
    from retrieval.data.duplicates import THRESHOLDS, folder_pairs

    given = {"cf": cf_threshold, "ffa": ffa_threshold}
    limits = {m: THRESHOLDS[m] if v is None else v for m, v in given.items()}
    with bad_input():
        pairs = folder_pairs(folder, limits, progress=sys.stderr.isatty())
    if as_json:
        records = [p.record() for p in pairs]
        typer.echo(json.dumps({"folder": str(folder), "thresholds": limits, "pairs": records}))
        return
    typer.echo(f"{'case a':24} {'case b':24} {'modality':8} {'distance':>8}")
    for p in pairs:
        typer.echo(f"{p.a:24} {p.b:24} {p.modality:8} {p.distance:8.3f}")
    typer.echo(f"{len(pairs)} near-duplicate pair(s) (thresholds {limits})")


@app.command()
def info(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Summarise a cohort: counts by diagnosis, eye and split; frame counts; sizes."""
    from retrieval.data.cohort import Cohort
    from retrieval.data.info import cohort_summary, format_summary

    with bad_input():
        summary = cohort_summary(Cohort.open(cohort), progress=sys.stderr.isatty())
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps what it builds.")] = Path(
        ".demo"
    ),
    cases: Annotated[int, typer.Option(min=8, help="Phantom cases.")] = 128,
    seed: Annotated[int, typer.Option(help="Phantom and training seed.")] = 0,
    minutes: Annotated[
        float, typer.Option(min=0.05, help="Generator training budget (first run only).")
    ] = 3.0,
    embed_minutes: Annotated[
        float, typer.Option(min=0.05, help="Embedding-head training budget (first run only).")
    ] = 1.5,
    host: Annotated[str, typer.Option(help="Interface both servers listen on.")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option(help="API port (another if taken).")] = 8000,
    ui_port: Annotated[int, typer.Option(help="Dashboard port (another if taken).")] = 8501,
    serve: Annotated[
        bool, typer.Option(help="Start the API and dashboard (--no-serve: build and evaluate).")
    ] = True,
):
    """Phantom cohort → train the tiny model → index → API + dashboard (cached between runs)."""
    from .demo import ensure_report, prepare_demo, serve_demo

    with bad_input():
        paths = prepare_demo(
            workdir,
            cases=cases,
            seed=seed,
            generator_minutes=minutes,
            embed_minutes=embed_minutes,
            say=typer.echo,
        )
        if serve:
            serve_demo(paths, host=host, api_port=api_port, ui_port=ui_port, say=typer.echo)
        else:
            ensure_report(paths, say=typer.echo)


@app.command("ui")
def ui_command(
    api: Annotated[str, typer.Option(help="Base URL of a running API.")] = "http://127.0.0.1:8000",
    port: Annotated[int, typer.Option(help="Dashboard port.")] = 8501,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
):
    """The Streamlit dashboard, talking to the API at --api (`streamlit run ui/app.py`)."""
    from .processes import run_dashboard

    typer.echo(f"dashboard: http://{host}:{port}  (API: {api}; Ctrl-C stops it)")
    raise typer.Exit(code=run_dashboard(api, port, host=host))


def _parse_times(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"--times must be comma-separated seconds, got {text!r}") from e


SNAPSHOT_EVERY_HELP = "Generator iterations per resumable checkpoint (0: at the end only)."
BATCH_SIZE_HELP = "Generator batch; under torchrun the global batch, split evenly."


TRAIN_PRECISION_HELP = (
    "Generator: auto (bfloat16 autocast where the device has it natively: CUDA, or a CPU "
    "with AVX512-BF16) or float32."
)

VARIANT_HELP = (
    "no-knowledge-discriminator (the default: level with the paper's model and faster), "
    "full (the paper's model, with the knowledge-aware discriminator), or no-knowledge-mask, "
    "per-frame, per-frame-no-knowledge-discriminator."
)

CF_HISTOGRAM_MATCH_HELP = (
    "Embedder: match each CF photo's colour channels to the training photos' histogram "
    "(undoes exposure, gamma and colour balance)."
)


@app.command()
def train(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder (its train split is used).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    scale: Annotated[str, typer.Option(help="Model scale: tiny or paper.")] = "tiny",
    minutes: Annotated[float | None, typer.Option(min=0.01, help="Wall-clock budget.")] = None,
    iters: Annotated[int | None, typer.Option(min=0, help="Iteration budget.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    variant: Annotated[str, typer.Option(help=VARIANT_HELP)] = "no-knowledge-discriminator",
    batch_size: Annotated[int, typer.Option(min=1, help=BATCH_SIZE_HELP)] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    vgg_weights: Annotated[
        Path | None, typer.Option(help="Local VGG19 state dict: enables the perceptual loss.")
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="generator or embed (default: both; --minutes is split between them)."),
    ] = None,
    backbone: Annotated[
        str, typer.Option(help="Embedder backbone: generator, scratch, openclip:<model>, pixels.")
    ] = "generator",
    embedder_out: Annotated[
        Path | None, typer.Option(help="Embedder folder (default: RUN/embedder).")
    ] = None,
    embed_iters: Annotated[
        int | None,
        typer.Option(min=1, help="Embedder iterations when both stages run (default: --iters)."),
    ] = None,
    snapshot_every: Annotated[int, typer.Option(min=0, help=SNAPSHOT_EVERY_HELP)] = 500,
    overwrite: Annotated[bool, typer.Option(help="Replace an embedder in its folder.")] = False,
    precision: Annotated[str, typer.Option(help=TRAIN_PRECISION_HELP)] = "auto",
    cf_histogram_match: Annotated[bool, typer.Option(help=CF_HISTOGRAM_MATCH_HELP)] = True,
):
    """Train the generator, then the embedding heads (progress bars show the losses).

    With both stages and --minutes M, the generator gets M x (1 - EMBED_SHARE) and the
    embedder the rest. With --stage embed, --minutes / --iters are the embedder's.
    """
    from retrieval.models.embedding import train_embedder
    from retrieval.models.generation import train_run

    g_minutes, e_minutes, e_iters = _stage_budgets(stage, minutes, iters, embed_iters)
    with bad_input():
        if stage in (None, "generator"):
            options = _generator_options(
                scale, variant, g_minutes, iters, batch_size, seed, vgg_weights,
                snapshot_every=snapshot_every, precision=precision,
            )  # fmt: skip
            typer.echo(_trained(train_run(cohort, out, options, resume=resume), "generator"))
        if stage in (None, "embed"):
            embed = train_embedder(
                out, cohort, backbone=backbone, out=embedder_out, seed=seed,
                minutes=e_minutes, iters=e_iters, overwrite=overwrite,
                cf_histogram_match=cf_histogram_match,
            )  # fmt: skip
            typer.echo(_trained(embed, f"embedder ({backbone})"))


def _stage_budgets(
    stage: str | None, minutes: float | None, iters: int | None, embed_iters: int | None
) -> tuple[float | None, float | None, int | None]:
    """`train`'s (generator minutes, embedder minutes, embedder iterations): with both
    stages, --minutes is split and --embed-iters replaces --iters for the embedder."""
    from retrieval.models.embedding import EMBED_SHARE

    if stage not in (None, "generator", "embed"):
        raise typer.BadParameter(f"--stage must be generator or embed, got {stage!r}")
    if minutes is None and iters is None:
        raise typer.BadParameter("give --minutes or --iters")
    e_iters = (embed_iters or iters) if stage is None else iters
    if stage is not None or minutes is None:
        return minutes, minutes, e_iters
    return minutes * (1 - EMBED_SHARE), minutes * EMBED_SHARE, e_iters


def _generator_options(
    scale: str,
    variant: str,
    minutes: float | None,
    iters: int | None,
    batch_size: int,
    seed: int,
    vgg_weights: Path | None,
    **more,
):
    """`train`'s generator options (an `encoder.train.GeneratorTrainOptions`); `more`
    are further fields of it."""
    from encoder import list_scales
    from encoder.train import GeneratorTrainOptions
    from retrieval.models.generation import VARIANTS

    if scale not in list_scales():
        raise typer.BadParameter(f"--scale must be one of {list_scales()}, got {scale!r}")
    if variant not in VARIANTS:
        raise typer.BadParameter(f"--variant must be one of {list(VARIANTS)}, got {variant!r}")
    return GeneratorTrainOptions(
        scale=scale,
        minutes=minutes,
        iters=iters,
        batch_size=batch_size,
        seed=seed,
        vgg_weights=str(vgg_weights) if vgg_weights else None,
        **VARIANTS[variant],
        **more,
    )


def _trained(summary, what: str) -> str:
    """The line `train` prints after a stage (a `encoder.train.TrainingSummary`)."""
    return (
        f"{summary.run_dir}: {what} {summary.iterations} iterations in "
        f"{summary.elapsed_s / 60:.1f} min (stopped by {summary.stop_reason})"
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
    from retrieval.data.media_write import write_mp4
    from retrieval.models.generation import generate_video

    with bad_input():
        frames, used = generate_video(run, cf_image, times_s=_parse_times(times))
    with _writing("--out", out):
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
    embedder: Annotated[
        list[str] | None,
        typer.Option(help="NAME=FOLDER of another embedder of RUN (e.g. a backbone); repeat."),
    ] = None,
    metrics: Annotated[
        str, typer.Option(help="all, generation or retrieval (retrieval needs RUN/embedder).")
    ] = "all",
):
    """Generation and retrieval metrics on held-out patients, with baselines."""
    from retrieval.evaluation.generation import evaluate_runs, generation_table, write_report
    from retrieval.evaluation.retrieval import (
        evaluate_retrieval,
        retrieval_table,
        write_reliability,
    )
    from retrieval.models.embedding import default_embedder_dir

    if metrics not in ("all", "generation", "retrieval"):
        raise typer.BadParameter(f"--metrics must be all, generation or retrieval, got {metrics!r}")
    runs = {"model": run, **_named_paths(compare, "--compare", "RUN")}
    embedders: dict[str, tuple[Path, Path | None]] = {}
    if (default_embedder_dir(run) / "config.json").is_file():
        embedders["model"] = (run, None)
    for name, folder in _named_paths(embedder, "--embedder", "FOLDER").items():
        embedders[name] = (run, folder)
    if metrics == "retrieval" and not embedders:
        raise typer.BadParameter(f"{run} has no embedder; train it with --stage embed")
    report: dict = {}
    with bad_input():
        if metrics in ("all", "generation"):
            report = evaluate_runs(runs, cohort, split=split, i3d_path=i3d)
            typer.echo(generation_table(report))
        if metrics in ("all", "retrieval") and embedders:
            synthesis_for = "model" if "model" in embedders else None
            report["retrieval"] = evaluate_retrieval(
                embedders, cohort, split=split, synthesis_for=synthesis_for
            )
            typer.echo(retrieval_table(report["retrieval"]))
    with _writing("--out", out):
        png = write_reliability(report, out)
        write_report(report, out)
    typer.echo(f"report: {out}" + (f" (reliability diagram: {png})" if png else ""))


def _named_paths(items: list[str] | None, option: str, what: str) -> dict[str, Path]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{option} must be NAME={what}, got {item!r}")
        out[name] = Path(path)
    return out


# `index`'s precision and Ray options
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="Backbone precision: auto (bfloat16 where the CPU or GPU has it natively, "
        "2.3x faster), float32 or bfloat16. Queries to this index use the same."
    ),
]
RayFlag = Annotated[
    bool, typer.Option("--ray", help="Embed on Ray Data (pip install -e '.[scale]').")
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join (auto, ray://HOST:10001); default: a local Ray."),
]
RayWorkersOption = Annotated[int, typer.Option(help="Ray: embedding actors.")]
RayCpusOption = Annotated[float, typer.Option(help="Ray: CPUs per actor.")]
RayShardsOption = Annotated[
    Path | None,
    typer.Option(
        help="Ray: parquet shards, kept until the index is written (default: OUT.shards); "
        "a killed job rerun with the same options resumes from them."
    ),
]


def _ray_options(ray: bool, address, workers, cpus_per_worker, shards):
    if not ray:
        if address or shards or workers != 1 or cpus_per_worker != 1.0:
            raise _fail(
                "--ray-address, --ray-workers, --ray-cpus-per-worker and --ray-shards are for --ray"
            )
        return None
    from retrieval.models.ray_embedding import RayOptions

    return RayOptions(address, workers, cpus_per_worker, shards)


@app.command()
def index(
    run: Annotated[Path, typer.Argument(help="Run folder with a trained embedder.")],
    cohort: Annotated[Path, typer.Argument(help="Cohort folder to embed (every split).")],
    out: Annotated[Path, typer.Option("--out", help="Index folder to write (atomically).")],
    embedder: Annotated[
        Path | None, typer.Option(help="Embedder folder (default: RUN/embedder).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="Vector store: faiss (files in the folder) or milvus.")
    ] = "faiss",
    uri: Annotated[
        str | None,
        typer.Option(help="Milvus: http://host:19530, or a Milvus Lite file FILE.db."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FUNDUS2VIDEO_MILVUS_TOKEN",
            help="Milvus token (user:password or API key); never written to the folder.",
        ),
    ] = None,
    milvus_prefix: Annotated[
        str, typer.Option(help="Milvus collection names: PREFIX_cf_..., PREFIX_ffa_....")
    ] = "fundus2video",
    precision: PrecisionOption = "auto",
    ray: RayFlag = False,
    ray_address: RayAddressOption = None,
    ray_workers: RayWorkersOption = 1,
    ray_cpus_per_worker: RayCpusOption = 1.0,
    ray_shards: RayShardsOption = None,
):
    """Embed every case of a cohort and write an index folder (FAISS per modality + catalog;
    with --backend milvus, a Milvus collection per modality that the folder names)."""
    from index import MilvusTarget
    from retrieval.models.embedding import build_index

    with bad_input():
        if uri is not None and backend != "milvus":
            raise _fail("--uri is for --backend milvus")
        target = MilvusTarget(uri or "", token, milvus_prefix) if backend == "milvus" else None
        options = _ray_options(ray, ray_address, ray_workers, ray_cpus_per_worker, ray_shards)
        precision = None if precision == "auto" else precision
        manifest = build_index(
            run, cohort, out, embedder_dir=embedder, backend=backend, milvus=target,
            precision=precision, ray=options,
        )  # fmt: skip
    typer.echo(f"{out}: {_index_summary(manifest)}")


def _index_summary(manifest: dict) -> str:
    counts = ", ".join(f"{m} {n}" for m, n in manifest["counts"].items())
    keys = ", ".join(f"{m} {k}" for m, k in manifest["index_keys"].items())
    where = f"; {manifest['backend']}" if manifest.get("backend", "faiss") != "faiss" else ""
    precision = (manifest.get("extra") or {}).get("precision", "float32")
    return f"{counts} vectors of dimension {manifest['dim']} ({keys}{where}; {precision})"


@app.command()
def snapshot(
    index: Annotated[Path, typer.Argument(help="Index folder (may be served and written).")],
    out: Annotated[Path, typer.Argument(help="Snapshot folder to write (atomically).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    link: Annotated[
        bool, typer.Option(help="Hard-link the files instead of copying (same file system).")
    ] = False,
):
    """Copy an index folder as one consistent state, even while `serve` adds and deletes
    cases (a backup: `serve OUT` serves it)."""
    from index import snapshot_index_folder

    with bad_input():
        taken = snapshot_index_folder(index, out, overwrite=overwrite, link=link)
    counts = ", ".join(f"{m} {n}" for m, n in taken.manifest["counts"].items())
    typer.echo(
        f"{out}: snapshot of {index} ({taken.manifest['catalog_rows']} cases; {counts} "
        f"vectors; {taken.files} files, {taken.bytes / 2**20:.1f} MiB; "
        f"{taken.attempts} attempt{'s' if taken.attempts > 1 else ''})"
    )


@app.command()
def search(
    index: Annotated[Path, typer.Argument(help="Index folder (from `fundus2video index`).")],
    file: Annotated[Path, typer.Argument(help="Query: a CF photo, or an FFA video / frames.")],
    target: Annotated[str, typer.Option(help="Modality to search: cf, ffa or both.")] = "ffa",
    k: Annotated[int, typer.Option(min=1, max=1000, help="Results to return.")] = 10,
    via: Annotated[str, typer.Option(help="direct, synthesis or fused (CF→FFA).")] = "direct",
    times: Annotated[
        str | None, typer.Option(help="FFA query frame times in seconds, comma-separated.")
    ] = None,
    similarity: Annotated[
        str | None,
        typer.Option(
            help="clinical (same disease; the default), pair (same eye: a photo's own "
            "angiogram) or combined (both); pair only, without a clinical part."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
    positive: Annotated[list[str] | None, typer.Option(help=POSITIVE_HELP)] = None,
    negative: Annotated[list[str] | None, typer.Option(help=NEGATIVE_HELP)] = None,
    feedback: Annotated[str | None, typer.Option(help="rocchio (default) or best_score.")] = None,
    region: Annotated[str | None, typer.Option(help=REGION_HELP)] = None,
    vessel_check: Annotated[bool, typer.Option(help=VESSEL_CHECK_HELP)] = True,
):
    """Ranked cases for a query file (a CF photo or an FFA video), and the diagnosis
    suggested by its most similar archive cases (decision support, not a diagnosis)."""
    from retrieval.data.media import CF_SUFFIXES, read_cf, read_ffa
    from retrieval.search.engine import SIMILARITIES, CFQuery, Engine, FFAQuery

    if similarity is not None and similarity not in SIMILARITIES:
        raise typer.BadParameter(
            f"--similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}"
        )
    with bad_input():
        if file.is_file() and file.suffix.lower() in CF_SUFFIXES and times is None:
            query = CFQuery(read_cf(file))
        else:
            query = FFAQuery(read_ffa(file), _parse_times(times))
        engine = Engine.open(index)
        marks = {"positive": positive, "negative": negative, "feedback": feedback, "region": region}
        marks["vessel_check"] = vessel_check
        result = engine.search(query, target=target, k=k, via=via, similarity=similarity, **marks)
    rows = [_hit_row(h) for h in result.hits]
    if as_json:
        typer.echo(json.dumps(_search_record(result, rows, target, via), indent=2))
        return
    if result.synthetic is not None:
        typer.echo("query searched through its synthesized (SYNTHETIC) FFA video")
    if result.query.get("feedback"):
        typer.echo(feedback_line(result.query))
    typer.echo(f"{'rank':>4}  {'case':<14}{'score':>9}  {'modality':<8} {'diagnosis':<9} lesions")
    for r in rows:
        typer.echo(
            f"{r['rank']:>4}  {r['case_id']:<14}{r['score']:>9.4f}  {r['modality']:<8} "
            f"{r['diagnosis'] or '-':<9} {', '.join(r['lesions']) or '-'}{_region_note(r)}"
            f"{_vessel_note(r)}"
        )
    if result.suggestion is not None:
        typer.echo(suggestion_line(result.suggestion))


@app.command()
def explain(
    index: Annotated[Path, typer.Argument(help="Index folder (from `fundus2video index`).")],
    case_id: Annotated[str, typer.Argument(help="The query case.")],
    other_id: Annotated[str, typer.Argument(help="The result case to explain.")],
    similarity: Annotated[
        str | None, typer.Option(help="clinical (the default), pair or combined.")
    ] = None,
    modality: Annotated[str, typer.Option(help="The query's embedding: cf or ffa.")] = "cf",
    target: Annotated[
        str | None, typer.Option(help="The result's embedding: cf or ffa (default: --modality).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole explanation.")] = False,
):
    """Why OTHER_ID matches CASE_ID: the score, each side's regions summing to it (the sum
    check), the top regions and, for an angiogram, its phases' shares."""
    from retrieval.search.engine import CaseQuery, Engine
    from retrieval.search.explain import explanation_lines

    if modality not in ("cf", "ffa") or target not in (None, "cf", "ffa"):
        bad = "--modality" if modality not in ("cf", "ffa") else "--target"
        raise typer.BadParameter(f"{bad} must be cf or ffa")
    with bad_input():
        engine = Engine.open(index)
        found = engine.explain(CaseQuery(case_id, modality), other_id, similarity, target)
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2))
        return
    typer.echo("\n".join(explanation_lines(found)))


def _hit_row(hit) -> dict:
    """One ranked case as `search --json` prints it."""
    return {
        "rank": hit.rank,
        "case_id": hit.case.case_id,
        "score": round(hit.score, 6),
        "modality": hit.modality,
        "diagnosis": hit.case.diagnosis,
        "eye": hit.case.eye,
        "lesions": list(hit.case.lesions),
        "split": hit.case.split,
        "region": None if hit.region is None else [round(v, 4) for v in hit.region],
        "region_score": None if hit.region_score is None else round(hit.region_score, 6),
        "vessel_match": None if hit.vessel_match is None else round(hit.vessel_match, 4),
    }


def _region_note(row: dict) -> str:
    """`  [matched at x0,y0,x1,y1]` for a region query's hit, else nothing."""
    if row.get("region") is None:
        return ""
    return "  [matched at " + ",".join(f"{v:.3f}" for v in row["region"]) + "]"


def _vessel_note(row: dict) -> str:
    """`  [vessels 0.48]` for a vessel-checked search's hit, else nothing."""
    return "" if row.get("vessel_match") is None else f"  [vessels {row['vessel_match']:.2f}]"


def _search_record(result, rows: list[dict], target: str, via: str) -> dict:
    """The `search --json` document: the query, the ranked rows, the suggestion."""
    from retrieval.search.engine import suggestion_record

    out = {
        "query": result.query,
        "target": target,
        "via": via,
        "similarity": result.similarity,
        "vessel_checked": result.vessel_checked,
        "results": rows,
        "suggestion": suggestion_record(result),
    }
    if result.synthetic is not None:
        out["synthetic_query"] = {"synthetic": True, "times_s": result.synthetic.times_s.tolist()}
    return out


VESSEL_CHECK_HELP = (
    "With --similarity pair (via direct, no feedback or region): re-rank the best hits by how "
    "well the query's vessels lie on each case's; a turned, zoomed or cropped photo still "
    "finds its own angiogram. --no-vessel-check ranks by the embedding alone."
)
POSITIVE_HELP = "Relevance feedback: a case id marked relevant (repeat: --positive A --positive B)."
NEGATIVE_HELP = "Relevance feedback: a case id marked not relevant (repeatable)."
REGION_HELP = (
    "Search by a box of the CF query photo: x0,y0,x1,y1 normalised (0-1, y down), e.g. "
    "0.55,0.40,0.75,0.60. The default similarity finds its content anywhere in other eyes "
    "(each result shows where it matched); --similarity pair, at the same place."
)


def feedback_line(query: dict) -> str:
    """`refined by 2 positive, 1 negative (rocchio)`: the marks a search used."""
    pos, neg = len(query.get("positive") or ()), len(query.get("negative") or ())
    return f"refined by {pos} positive, {neg} negative ({query.get('feedback')})"


def suggestion_line(suggestion) -> str:
    """`suggestion from similar cases: PDR (p=0.93, 7 of 10 neighbours)`, or the abstention."""
    head = "suggestion from similar cases:"
    if suggestion.abstained:
        return f"{head} abstained (top {suggestion.diagnosis} p={suggestion.probability:.2f})"
    return (
        f"{head} {suggestion.diagnosis} (p={suggestion.probability:.2f}, "
        f"{len(suggestion.supporting_case_ids)} of {suggestion.neighbours} neighbours)"
    )


def serve_banner(cases: int, index: Path, url: str, api) -> str:
    """`serve`'s start-up lines: what is served where and who may use it; the readiness
    and liveness probes' and the Prometheus metrics' URLs."""
    settings = api.state.settings
    key = " (API key required)" if settings.api_key and not settings.metrics_public else ""
    return (
        f"serving {cases} cases from {index} at {url} once loaded "
        f"(docs: /docs; {api.state.access.describe()})\n"
        f"readiness: {url}/ready  liveness: {url}/health  metrics: {url}/metrics{key}"
    )


def _served_app(index: Path, audit_log: Path | None):
    """`serve`'s app, which loads `index` in the background once it listens (/ready is
    "loading" meanwhile), and the index's case count; a folder that is not an index, bad
    settings or keys fail here, before it listens."""
    from pydantic import ValidationError

    from retrieval.api import Settings, create_app
    from retrieval.search.engine import Engine

    try:
        extra = {"audit_log": audit_log} if audit_log else {}
        settings = Settings(index=index, load_in_background=True, **extra)
        manifest = Engine.check_folder(index)
        return create_app(settings), manifest["catalog_rows"]  # checks the keys, the audit log
    except ValidationError as e:  # the environment's settings: the user's input too
        raise _fail(f"bad FUNDUS2VIDEO_* setting: {e}") from e
    except project_errors() as e:
        raise _fail(e) from e


@app.command()
def serve(
    index: Annotated[Path, typer.Argument(help="Index folder (from `fundus2video index`).")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    audit_log: Annotated[
        Path | None,
        typer.Option(
            help="Append the audit log (one JSON line per add/delete attempt) to this file "
            "(FUNDUS2VIDEO_AUDIT_LOG); it always goes to the logger fundus2video.audit too.",
            dir_okay=False,
        ),
    ] = None,
):
    """Serve the HTTP API over an index folder (OpenAPI docs at /docs).

    Settings are FUNDUS2VIDEO_* environment variables (retrieval/api/settings.py):

    FUNDUS2VIDEO_API_KEY: the read key (once set, reads need a key).
    FUNDUS2VIDEO_WRITE_KEY: the write key (POST /cases, DELETE /cases/{id}).
    FUNDUS2VIDEO_KEYS_FILE: more named keys with roles (JSON or TOML).
    FUNDUS2VIDEO_OPEN_WRITES=true: writes without a write key (local use).
    FUNDUS2VIDEO_RATE_SEARCH (600/minute), FUNDUS2VIDEO_RATE_GENERATE
    (30/minute), FUNDUS2VIDEO_RATE_WRITE (60/minute): limits per key, or per
    client address without one; empty: no limit.
    FUNDUS2VIDEO_AUDIT_LOG: as --audit-log.
    FUNDUS2VIDEO_CORS_ORIGINS: a JSON list of origins (default: no CORS).
    Limits: FUNDUS2VIDEO_MAX_UPLOAD_BYTES, FUNDUS2VIDEO_MAX_K, ...
    """
    import os

    # One OpenMP thread per FAISS search (read once, when FAISS loads): a single query
    # gains nothing from a team, and idle teams spinning in every worker thread starve
    # the CPU under concurrent requests. torch keeps its own thread count (set below).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import uvicorn

    torch.set_num_threads(os.cpu_count() or 1)
    api, cases = _served_app(index, audit_log)
    typer.echo(serve_banner(cases, index, f"http://{host}:{port}", api))
    uvicorn.run(
        api,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":  # `python -m retrieval.apps.cli`, e.g. under torchrun
    app()
