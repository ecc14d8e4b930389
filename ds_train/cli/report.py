"""`ds-train report RUN_DIR`: loss, throughput and MFU from metrics.jsonl, rendered to a PNG, the
run's goodput over all its attempts, and the summaries of any profiles (`profile.*`) it recorded.
`ds-train report RUN_A RUN_B ...`: the runs compared on one figure (report/compare.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="plot a run's loss, throughput and MFU to a PNG, or compare runs",
        description="Render RUN_DIR/metrics.jsonl (train and valid loss, tokens/s, MFU, gradient "
        "norm, learning rate) to RUN_DIR/report.png and print a short summary. Given several run "
        "directories, compare them: loss by step and by tokens, validation loss and throughput on one "
        "figure (compare.png), and a table of where each run stands.",
    )
    p.add_argument("run_dir", nargs="+", help="a run directory (holds metrics.jsonl), or several to compare")
    p.add_argument("-o", "--output", help="PNG path (default: RUN_DIR/report.png; compare.png for several)")
    p.add_argument("--dpi", type=int, default=110)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ds_train.config import ConfigError
    from ds_train.report.goodput import goodput
    from ds_train.report.per_layer_norms import write_layer_figure
    from ds_train.report.plots import summary, write_report
    from ds_train.report.series import load_run_metrics
    from ds_train.train.callbacks.metrics_file import METRICS_FILE, read_metrics
    from ds_train.train.trace_summary import profile_lines

    dirs = [Path(d) for d in args.run_dir]
    for run_dir in dirs:
        if not (run_dir / METRICS_FILE).is_file():
            raise ConfigError(f"{run_dir} has no {METRICS_FILE} (is it a ds-train run directory?)")
    if len(dirs) > 1:
        return _compare(dirs, args)
    run_dir = dirs[0]
    records = read_metrics(run_dir)
    metrics = load_run_metrics(run_dir, records)
    if not len(metrics.loss) and not len(metrics.valid_loss):
        raise ConfigError(f"{run_dir / METRICS_FILE} holds no logged steps yet")
    out = write_report(run_dir, args.output, dpi=args.dpi, metrics=metrics)
    written = [out]
    if len(metrics.layers):  # train.per_layer_norms_every: a second figure next to the first
        title = f"{run_dir.resolve().name}: per-layer norms"
        written.append(
            write_layer_figure(metrics.layers, out.with_name("per_layer_norms.png"), title, args.dpi)
        )
    run_time = goodput(records)
    for line in [*summary(metrics), *([run_time.describe()] if run_time else []), *profile_lines(run_dir)]:
        print(line)
    for path in written:
        print(f"wrote {path}")
    return 0


def _compare(dirs: list[Path], args: argparse.Namespace) -> int:
    from ds_train.report.compare import comparison_lines, run_labels, write_comparison
    from ds_train.report.series import load_run_metrics

    runs = {label: load_run_metrics(d) for label, d in zip(run_labels(dirs), dirs)}
    out = write_comparison(runs, args.output, dpi=args.dpi)
    for line in comparison_lines(runs):
        print(line)
    print(f"wrote {out}")
    return 0
