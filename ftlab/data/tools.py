"""``ftlab data ...``: data tools that write files for the DataModules to read.

    ftlab data rouge-filter --input alpaca.json --output diverse.jsonl [--threshold 0.7]
                            [--against seeds.jsonl]
    ftlab data flan --input sst2/train.tsv --task sentiment --output sst2_instructions.jsonl [--seed 0]
    ftlab data sharegpt --input conversations.json --output instructions.jsonl
    ftlab data labelstudio --input export.json --output pairs.jsonl

Inputs are any file ``read_records`` reads (json, jsonl, csv, tsv, parquet, .gz); outputs are
jsonl (or json when the name ends in .json). Every command prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftlab.data._io import DataError, Record, read_records

SHARED = "../shared/data"


def _read(path: str) -> list[Record]:
    if not Path(path).exists() and path.startswith(SHARED):
        raise DataError(
            f"data file {path} does not exist (the shared data folder is expected beside the "
            "repository; pass --input)"
        )
    if Path(path).name.startswith("sts-"):  # STS Benchmark: tab-separated, no header (see pairs.read_sts)
        from ftlab.data.pairs import read_sts

        return read_sts(path)
    return read_records(path)


def write_records(rows: list[Record], path: str | Path) -> Path:
    """Write rows (without their ``_where``) as jsonl, or a json list for a ``.json`` name.

    The file is written beside the target and renamed over it when complete: a failure leaves
    whatever was there before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if k != "_where"} for r in rows]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump(clean, f, ensure_ascii=False, indent=1)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in clean)
    tmp.replace(path)
    return path


def _check_output(args: argparse.Namespace) -> None:
    """``--output`` must not be one of the files the command reads: it would replace the input."""
    out = getattr(args, "output", None)
    for name in ("input", "against"):
        source = getattr(args, name, None)
        if out and source and Path(out).exists() and Path(source).exists() and Path(out).samefile(source):
            raise DataError(
                f"--output {out} is the --{name} file; write the result to another file "
                "(the input would be replaced)"
            )


def _field_map(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for item in pairs or []:
        name, sep, column = item.partition("=")
        if not sep:
            raise ValueError(f"--field {item!r}: write task_field=column, e.g. sentence=text")
        out[name] = column
    return out


def rouge_filter_cmd(args: argparse.Namespace) -> None:
    from ftlab.data.curation import rouge_filter

    rows = _read(args.input)
    texts = [str(r.get(args.field) or "") for r in rows]
    missing = next((r for r in rows if args.field not in r), None)
    if missing is not None:
        raise DataError(f"{missing.get('_where', '?')}: missing field {args.field!r}")
    pool = [str(r.get(args.field) or "") for r in _read(args.against)] if args.against else []
    kept, stats = rouge_filter(texts, args.threshold, pool)
    if args.output:
        write_records([rows[i] for i in kept], args.output)
    print(
        f"rouge-filter: kept {stats['kept']} of {stats['rows']} rows (ROUGE-L < {args.threshold} against "
        f"{len(pool)} pool + earlier kept rows) in {stats['seconds']:.2f} s; exact LCS on "
        f"{stats['exact']:,} of "
        f"{stats['pairs']:,} pairs" + (f"; wrote {args.output}" if args.output else "")
    )


def flan_cmd(args: argparse.Namespace) -> None:
    from ftlab.data.flan import apply_templates

    rows = _read(args.input)
    out = apply_templates(rows, args.task, seed=args.seed, fields=_field_map(args.field))
    write_records(out, args.output)
    used = len({r["template"] for r in out})
    print(
        f"flan: {len(out)} instruction records from {args.input} ({used} templates used); wrote {args.output}"
    )


def sharegpt_cmd(args: argparse.Namespace) -> None:
    from ftlab.data.sharegpt import sharegpt_to_instructions

    out, empty = sharegpt_to_instructions(_read(args.input), args.conversations_field)
    write_records(out, args.output)
    turns = sum(len(r["history"]) for r in out)
    print(
        f"sharegpt: {len(out)} instruction records ({turns} history turns; {empty} conversations without a "
        f"complete exchange skipped); wrote {args.output}"
    )


def labelstudio_cmd(args: argparse.Namespace) -> None:
    from ftlab.data.preference import labelstudio_pairs

    out, counts = labelstudio_pairs(_read(args.input), args.prompt_field, args.left_field, args.right_field)
    write_records(out, args.output)
    print(
        f"labelstudio: {len(out)} preference pairs from {counts['tasks']} tasks ({counts['unlabelled']} "
        f"unlabelled, {counts['cancelled']} cancelled annotations); wrote {args.output}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftlab data", description="Data tools: filtering and format conversion."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rouge-filter", help="Self-Instruct ROUGE-L diversity filter")
    p.add_argument(
        "--input", default=f"{SHARED}/alpaca_5000_subset/alpaca_5000.json", help="records to filter"
    )
    p.add_argument("--output", help="where to write the kept records (omit to only count)")
    p.add_argument("--field", default="instruction", help="the text field compared")
    p.add_argument(
        "--threshold", type=float, default=0.7, help="keep a row only if every ROUGE-L F is below this"
    )
    p.add_argument("--against", help="records every row is also compared with (e.g. seed tasks), not written")
    p.set_defaults(run=rouge_filter_cmd)

    p = sub.add_parser("flan", help="FLAN-style templating of task rows into instruction data")
    p.add_argument("--input", required=True, help="task rows (e.g. a classification tsv)")
    p.add_argument("--output", required=True)
    p.add_argument("--task", required=True, help="sentiment, nli, similarity, or a JSON file of templates")
    p.add_argument(
        "--field", action="append", metavar="NAME=COLUMN", help="map a task field to a column (repeat)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-example template choice")
    p.set_defaults(run=flan_cmd)

    p = sub.add_parser("sharegpt", help="ShareGPT conversations to instruction records with history")
    p.add_argument("--input", default=f"{SHARED}/oasst1_en_100_trees/en_100_best_path.sharegpt.json")
    p.add_argument("--output", required=True)
    p.add_argument("--conversations_field", default="conversations")
    p.set_defaults(run=sharegpt_cmd)

    p = sub.add_parser("labelstudio", help="Label Studio pairwise export to prompt/chosen/rejected records")
    p.add_argument("--input", default=f"{SHARED}/labelstudio_pairwise_export/ls_output_data.json")
    p.add_argument("--output", required=True)
    p.add_argument("--prompt_field", default="prompt")
    p.add_argument("--left_field", default="answer1", help="task data field shown on the left")
    p.add_argument("--right_field", default="answer2", help="task data field shown on the right")
    p.set_defaults(run=labelstudio_cmd)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _check_output(args)
    args.run(args)


if __name__ == "__main__":
    main()
