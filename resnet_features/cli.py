"""Command line entry: parse, validate, run the job, print the summary, return the exit code."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

from resnet_features.core.config import config_from_args, get_args_parser
from resnet_features.core.entry import run_main
from resnet_features.core.errors import ConfigError

__all__ = ["main"]

log = logging.getLogger("resnet_features")

#: The last stderr line of a failed run: committed parts stay staged, so a rerun resumes.
RESUME_HINT = "rerun the same command to resume from the committed parts"

#: Once the job failed because its model node is gone: the most seconds this process may take
#: to report and exit (Ray's shutdown at exit talks to the damaged cluster) before it is ended.
EXIT_GRACE_SECONDS = 60


def _apply_demo(args) -> None:
    """--demo: sample photos and local folders, and weights that need no network."""
    # Imports torch: only for --demo, so that --help and argument errors stay fast.
    from resnet_features.core.models import hub_checkpoint_path, is_named_weights, named_weights
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
    """The job's entry: exit 0 (done, or a no-op), 3 (over the error budget), 2 (a UsageError:
    the message says what to fix) or 1 (any other failure; its traceback is in the log)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)  # argparse's own errors exit 2 here
    return run_main(lambda: _run(parser, args), what="the run", resume_hint=RESUME_HINT)


def _run(parser, args) -> int:
    if args.demo:
        _apply_demo(args)
    try:
        cfg = config_from_args(args)
    except ConfigError:
        parser.print_usage(sys.stderr)
        raise
    from resnet_features.extract import pipeline  # imports Ray: after validation

    try:
        result = pipeline.run(cfg)
    except pipeline.ModelNodeLost:
        # Bound the exit too: if the process still runs EXIT_GRACE_SECONDS from now,
        # faulthandler prints every thread's stack and ends it with exit 1 (nothing more needs
        # writing: committed parts are durable, and a rerun resumes from them).
        faulthandler.dump_traceback_later(EXIT_GRACE_SECONDS, exit=True)
        raise
    finally:
        pipeline.shutdown_ray()
    if result.summary.get("noop"):
        print(f"NO-OP: {result.reason}")
        return 0
    print(summary_paragraph(result.summary))
    if result.exit_code:
        print(f"error: {result.reason}", file=sys.stderr)
    return result.exit_code
