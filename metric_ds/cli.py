"""The ``metric-ds`` command: train, validate, prepare, pseudo-label, evaluate, predict, embed, export, report, env.

User errors print ``error: ...`` lines on stderr and exit 1 without a traceback (``--debug`` shows it).
"""
from __future__ import annotations

import argparse
import sys

from metric_ds.console import add_config_arguments, add_train_arguments, apply_local_rank, config_from_args, run_guarded
from metric_ds.pseudo_label import Settings

def _cmd_train(args: argparse.Namespace) -> None:
    from metric_ds.train import train_process

    train_process(config_from_args(args))


def _cmd_validate(args: argparse.Namespace) -> None:
    from metric_ds.data.pipeline import load_training_data
    from metric_ds.data.summary import format_summary, summarize
    from metric_ds.preflight import preflight

    cfg = config_from_args(args)
    preflight(cfg)
    data = load_training_data(cfg)
    print(format_summary(summarize(data, cfg)))
    print("ok: config and data are valid")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from metric_ds.data.prepare import prepare

    summary = prepare(
        args.input, args.output, text_column=args.text_column, label_column=args.label_column,
        classifier_fraction=args.classifier_fraction, classifier_per_class=args.classifier_per_class,
        metric_mask=args.metric_mask, seed=args.seed,
    )
    print(f"wrote {args.output}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from metric_ds.commands.evaluate import evaluate_command

    evaluate_command(args)


def _cmd_export(args: argparse.Namespace) -> None:
    from metric_ds.commands.export import export_command

    export_command(args)


def _cmd_predict(args: argparse.Namespace) -> None:
    from metric_ds.commands.predict import predict_command

    predict_command(args)


def _cmd_embed(args: argparse.Namespace) -> None:
    from metric_ds.commands.predict import embed_command

    embed_command(args)


def _add_inference_arguments(sp: argparse.ArgumentParser, outputs: str) -> None:
    sp.add_argument("--model", required=True, help="a run's best/ folder (or the run folder)")
    sp.add_argument("--input", required=True, help="table of texts (.parquet, .csv or .jsonl); every column is kept")
    sp.add_argument("--output", required=True, help=f"output file ({outputs}), written only when complete")
    sp.add_argument("--text-column", default="text")
    sp.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    sp.add_argument("--chunk-size", type=int, default=10_000, help="rows read, tokenised and written at a time")
    sp.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: the GPU when there is one)")


def _cmd_pseudo_label(args: argparse.Namespace) -> None:
    from metric_ds.commands.pseudo_label import pseudo_label_command

    pseudo_label_command(args)


def _cmd_report(args: argparse.Namespace) -> None:
    from metric_ds.report import build_report

    path = build_report(args.run_dir, args.out)
    print(f"report: {path}")


def _cmd_env(args: argparse.Namespace) -> None:
    from metric_ds.env_report import env_report

    print(env_report())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metric-ds", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("train", help="train a model from a YAML config")
    add_train_arguments(sp)
    sp.set_defaults(fn=_cmd_train)

    sp = sub.add_parser("validate", help="check a config and the dataset it points to, and summarise the data")
    add_config_arguments(sp)
    sp.set_defaults(fn=_cmd_validate)

    sp = sub.add_parser("prepare", help="convert a CSV/Parquet/JSONL table into metric_ds's format")
    sp.add_argument("--input", required=True, help="input table (.csv, .parquet or .jsonl)")
    sp.add_argument("--output", required=True, help="output table (.parquet, .csv or .jsonl)")
    sp.add_argument("--text-column", default="text")
    sp.add_argument("--label-column", default="label")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--classifier-fraction", type=float, default=None,
                       help="keep classifier_mask=1 on a stratified fraction of rows (limited labelling)")
    group.add_argument("--classifier-per-class", type=int, default=None,
                       help="keep classifier_mask=1 on N rows per class (limited labelling)")
    sp.add_argument("--metric-mask", choices=["all", "labelled"], default="all",
                    help="metric_mask=1 on all rows, or only on rows with classifier_mask=1")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=_cmd_prepare)

    sp = sub.add_parser("evaluate", help="evaluate an exported model on a prepared table")
    sp.add_argument("--model", required=True, help="an export folder, e.g. RUN_DIR/best")
    sp.add_argument("--data", required=True, help="a prepared table to evaluate on")
    sp.add_argument("--bank-data", default=None, help="table to build the retrieval bank from "
                    "(default: the model's training file)")
    sp.add_argument("--output", default=None, help="JSON file for the results (default: MODEL/eval/NAME.json)")
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--max-seq-length", type=int, default=None)
    sp.add_argument("--recall-at-k", type=int, nargs="+", default=[1, 5, 10])
    sp.add_argument("--knn-k", type=int, default=10)
    sp.add_argument("--distance", choices=["cos", "l2"], default="cos")
    sp.add_argument("--device", default=None, help="cuda, cpu... (default: the GPU when there is one)")
    sp.set_defaults(fn=_cmd_evaluate)

    sp = sub.add_parser("export", help="export a model for sentence-transformers (st) or ONNX Runtime (onnx)")
    sp.add_argument("source", metavar="RUN_OR_MODEL", help="a run folder (its best/ is exported) or an export folder")
    sp.add_argument("--format", required=True, choices=["st", "onnx"],
                    help="st: a sentence-transformers folder; onnx: model.onnx with the tokenizer beside it")
    sp.add_argument("--output", required=True, help="a new (or empty) folder")
    sp.set_defaults(fn=_cmd_export)

    sp = sub.add_parser("predict", help="classify the texts of a table with a trained model")
    _add_inference_arguments(sp, ".parquet, .csv or .jsonl")
    sp.add_argument("--top-k", type=int, default=1, help="also write the K best labels and their probabilities")
    sp.add_argument("--bank-data", default=None, help="labelled table (text, label): add knn_label, a k-NN vote")
    sp.add_argument("--knn-k", type=int, default=10)
    sp.add_argument("--distance", choices=["cos", "l2"], default="cos")
    sp.set_defaults(fn=_cmd_predict)

    sp = sub.add_parser("embed", help="embed the texts of a table with a trained model")
    _add_inference_arguments(sp, ".parquet: an embedding column beside the input's; .npy: an N x D matrix")
    sp.add_argument("--which", choices=["z", "h"], default="z",
                    help="z: the SupCon embedding; h: the pooled vector the classifier reads")
    sp.add_argument("--no-normalize", action="store_true", help="keep the vectors' norms")
    sp.set_defaults(fn=_cmd_embed)

    d = Settings()
    sp = sub.add_parser("pseudo-label", help="label unlabelled rows from clusters or neighbours of the labelled ones")
    sp.add_argument("--input", required=True, help="table with text and label; an empty label marks an unlabelled row")
    sp.add_argument("--output", required=True, help="the training table to write (.parquet, .csv or .jsonl)")
    sp.add_argument("--model", default=None, help="embedding model: a run's best/ folder or an encoder folder "
                    "(default: the bundled all-MiniLM-L6-v2)")
    sp.add_argument("--method", choices=["kmeans", "knn"], default=d.method,
                    help="k-means clusters with a purity threshold, or a vote of the labelled neighbours")
    sp.add_argument("--k-multiple", type=int, default=d.k_multiple, help="kmeans: k = N x the number of classes")
    sp.add_argument("--min-purity", type=float, default=d.min_purity,
                    help="kmeans: least share of a cluster's labelled rows that carry its majority label")
    sp.add_argument("--min-labelled", type=int, default=d.min_labelled,
                    help="kmeans: least labelled rows in a cluster")
    sp.add_argument("--neighbours", type=int, default=d.neighbours, help="knn: labelled neighbours that vote")
    sp.add_argument("--margin", type=float, default=d.margin,
                    help="knn: least lead of the top label's vote share over the runner-up's")
    sp.add_argument("--metric-mask", choices=["all", "labelled"], default=d.metric_mask,
                    help="all: SupCon on labelled and pseudo-labelled rows; labelled: on the labelled rows only "
                         "(pseudo-labelled rows are then left out, as in prepare)")
    sp.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction,
                    help="share of labelled rows hidden and pseudo-labelled to estimate the precision")
    sp.add_argument("--labelled-share", type=float, default=d.labelled_share,
                    help="repeat the labelled rows until they are about this share of the output (e.g. 0.5), so "
                         "that every batch holds some; then give train a validation table (data.val_path)")
    sp.add_argument("--seed", type=int, default=d.seed)
    sp.add_argument("--summary", default=None, help="also write the summary to this JSON file")
    sp.add_argument("--batch-size", type=int, default=128, help="embedding batch size")
    sp.add_argument("--max-seq-length", type=int, default=128, help="embedding truncation length")
    sp.set_defaults(fn=_cmd_pseudo_label)

    sp = sub.add_parser("report", help="plots and an HTML report of a run")
    sp.add_argument("run_dir", help="the run folder (checkpoints_dir/run_name)")
    sp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    sp.set_defaults(fn=_cmd_report)

    sp = sub.add_parser("env", help="versions, and whether the fused SupCon op is built for CPU and CUDA")
    sp.set_defaults(fn=_cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_local_rank(args)
    return run_guarded(lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
