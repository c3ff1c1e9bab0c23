"""Command line entry: parse, validate, run the job, print the summary, return the exit code."""

from __future__ import annotations

import logging
import os
import sys

from resnet_features.core.config import config_from_args, get_args_parser
from resnet_features.core.errors import ConfigError, UsageError
from resnet_features.core.logs import setup_logging
from resnet_features.core.models import hub_checkpoint_path, is_named_weights, named_weights

__all__ = ["main"]

log = logging.getLogger("resnet_features")

EXIT_USAGE = 2
EXIT_FAILED = 1


def _apply_demo(args) -> None:
    """--demo: sample photos and local folders, and weights that need no network."""
    from resnet_features.core.samples import write_samples

    args.input = args.input or os.path.join("demo", "images")
    args.output = args.output or os.path.join("demo", "output")
    args.overwrite = True
    if not os.path.isdir(args.input) or not os.listdir(args.input):
        write_samples(args.input)
    if is_named_weights(args.weights):
        path = hub_checkpoint_path(named_weights(args.model, args.weights))
        if not os.path.exists(path):
            log.warning(
                "DEMO: pretrained weights for %s are not in the torch hub cache (%s) and this "
                "demo does not download them, so it runs with --weights random: the pipeline "
                "is real, the labels and embeddings are not. Copy the file there (or pass "
                "--weights PATH) for meaningful output.", args.model, path)
            args.weights = "random"


def summary_paragraph(s: dict) -> str:
    by_stage = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_stage"].items())) or "none"
    skipped = s.get("skipped", {})
    inc = skipped.get("incremental")
    extra = (f"; computed {s['computed']} of {s['listed']} listed, reused "
             f"{s['reused']} from an interrupted attempt")
    if inc:
        extra += (f", {inc['skipped_unchanged']} unchanged skipped (--incremental; "
                  f"{inc['changed']} changed, {inc['new']} new)")
    if "retry_errors" in skipped:
        extra += f", retried {skipped['retry_errors']['retried']} failed inputs"
    return (
        f"{s['status'].upper()}: run {s['run_id']}: {s['inputs']} images from {s['input']} -> "
        f"{s['output']}/run={s['run_id']}/{extra}; "
        f"{s['succeeded']} succeeded, {s['failed']} failed (by stage: {by_stage}). "
        f"Model {s['model']} ({s['weights']}), task {s['task']}, {s['device']} "
        f"{s['precision']}, {s['elapsed_seconds']:.1f}s; "
        f"{len(s.get('files', []))} data files, {len(s.get('error_files', []))} error files. "
        f"{s['reason']}"
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        _apply_demo(args)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from resnet_features.extract.pipeline import run  # imports Ray: after validation

    try:
        result = run(cfg)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001
        # Not the input's fault (storage down after retries, a broken device, a dead cluster):
        # the traceback goes to the log, the reason to the last line; committed parts stay
        # staged, so rerunning the same command resumes.
        log.exception("the run failed")
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"error: the run failed ({type(exc).__name__}: {first_line}); rerun the same "
              f"command to resume from the committed parts", file=sys.stderr)
        return EXIT_FAILED
    if result.summary.get("noop"):
        print(f"NO-OP: {result.reason}")
        return 0
    print(summary_paragraph(result.summary))
    if result.exit_code:
        print(f"error: {result.reason}", file=sys.stderr)
    return result.exit_code
