"""`promptseg eval`: Dice per dataset, label and K for the model and the two baselines on the same episodes."""
from __future__ import annotations

import argparse
import os

from promptseg.cli.common import resolve_device
from promptseg.cli.train import dataset_folders
from promptseg.data.index import CASE_SETS, build_tasks
from promptseg.data.io import write_text
from promptseg.engine.adaptation import MAX_ADAPT_STEPS, Adaptation
from promptseg.engine.ensemble import MAX_ENSEMBLE
from promptseg.engine.segmenter import packaged_weights_path
from promptseg.errors import InputError
from promptseg.eval.baselines import (
    FineTunedUNetBaseline,
    ModelPredictor,
    NearestPromptBaseline,
)
from promptseg.eval.evaluate import EvalReport, evaluate
from promptseg.eval.plot import plot_dice_against_k
from promptseg.train.checkpoint import load_model

METHODS = ("promptseg", "nearest_prompt", "finetuned_unet")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score the model and two baselines on held-out datasets",
        description="Dice (mean and std over fixed-seed episodes) per dataset, label and number of prompts K, "
        "for the model, a nearest-prompt label copy and a small U-Net fine-tuned on the K prompts.",
    )
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="dataset folders, or folders of them")
    parser.add_argument("--cases", choices=CASE_SETS, default="all",
                        help="score every case (held-out datasets), or only the fixed 20%% case split that "
                        "`promptseg train` leaves out ('held': fit on unseen cases of training datasets; "
                        "'held-queries': those cases queried, prompted from the training cases) (default all)")
    parser.add_argument("--cache", metavar="DIR", help="packed dataset cache (as for promptseg train)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], metavar="K")
    parser.add_argument("--episodes", type=int, default=20, metavar="N", help="prompt draws per task and K")
    parser.add_argument("--queries", type=int, default=4, help="queries per episode")
    parser.add_argument("--prompt-kind", choices=("mask", "click", "box", "scribble"), default="mask",
                        help="prompt every episode with its masks (default) or with one click, box or scribble "
                        "per prompt image, drawn from the mask")
    parser.add_argument("--query-prompts", action="store_true",
                        help="score the prompted images themselves (interactive use) instead of other queries")
    parser.add_argument("--adapt", type=int, default=0, metavar="STEPS",
                        help="test-time adaptation: fit the model's normalisation scales and output head to each "
                        "episode's prompts for STEPS leave-one-out steps first (reported as promptseg_adaptSTEPS; "
                        f"0..{MAX_ADAPT_STEPS}, default 0: off)")
    parser.add_argument("--ensemble", type=int, default=1, metavar="N",
                        help=f"average the model over N ensemble members per episode: drop-one prompt subsets, then "
                        f"flips, calibrated on the prompts they leave out (1..{MAX_ENSEMBLE}, default 1: off; "
                        "reported as promptseg_ensN)")
    parser.add_argument("--ensemble-shift", choices=("on", "off"), default="on",
                        help="with --ensemble: move the mask threshold by the logit shift that scores best on the "
                        "prompts the members leave out, and divide the members' logits by the temperature that fits "
                        "those prompts best (on, default), or neither (off, the averaging alone; reported as "
                        "promptseg_ensN_noshift); the probabilities are never shifted")
    parser.add_argument("--checkpoint", metavar="FILE", help="weights (default: the packaged weights)")
    parser.add_argument("--out", metavar="FILE.json", help="write the full report as JSON")
    parser.add_argument("--markdown", metavar="FILE.md", help="also write the table as markdown")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw mean Dice over tasks against K, one line per method")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out, --markdown and --plot files")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="NAME",
                        help=f"methods to score: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="FILE.json",
                        help="add the methods and tasks of earlier reports drawn with the same --episodes, --queries, "
                        "--seed and --shots (e.g. baselines scored once, or datasets scored in parallel)")
    parser.add_argument("--unet-steps", type=int, default=60, help="fine-tuning budget of the U-Net baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def check_output_files(paths: list[str | None], overwrite: bool) -> None:
    """InputError naming the first output path that is a folder, or that exists without `overwrite`
    (checked before anything is scored)."""
    for path in paths:
        if path is not None and os.path.isdir(path):
            raise InputError(path, "is a folder, expected a file name")
        if path is not None and os.path.exists(path) and not overwrite:
            raise InputError(path, "output exists; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    if any(k < 1 or k > 64 for k in args.shots):
        raise InputError("--shots", f"each K must lie in 1..64, got {args.shots}")
    if not 0 <= args.adapt <= MAX_ADAPT_STEPS:
        raise InputError("--adapt", f"must lie in 0..{MAX_ADAPT_STEPS}, got {args.adapt}")
    if not 1 <= args.ensemble <= MAX_ENSEMBLE:
        raise InputError("--ensemble", f"must lie in 1..{MAX_ENSEMBLE}, got {args.ensemble}")
    if args.episodes < 1:
        raise InputError("--episodes", f"must be positive, got {args.episodes}")
    if args.queries < 1:
        raise InputError("--queries", f"must be positive, got {args.queries}")
    check_output_files([args.out, args.markdown, args.plot], args.overwrite)
    device = resolve_device(args.device)
    model = load_model(args.checkpoint or packaged_weights_path()).to(device)
    tasks = build_tasks(dataset_folders(args.data, []), model.config.resolution, progress=not args.no_progress,
                        cache_dir=args.cache, cases=args.cases)
    if not tasks:
        raise InputError(" ".join(args.data), "no task with enough annotated examples")
    earlier = [(path, EvalReport.load(path)) for path in args.merge]
    adaptation = Adaptation(args.adapt, seed=args.seed) if args.adapt else None
    makers = {
        "promptseg": lambda: ModelPredictor(model, device, adaptation, args.ensemble, args.ensemble_shift == "on"),
        "nearest_prompt": NearestPromptBaseline,
        "finetuned_unet": lambda: FineTunedUNetBaseline(steps=args.unet_steps, seed=args.seed),
    }
    planned = {"episodes": args.episodes, "queries": args.queries, "seed": args.seed, "shots": list(args.shots),
               "prompt_kind": args.prompt_kind, "query_prompts": args.query_prompts}
    for path, other in earlier:
        other.check_same_episodes(planned, path)
    suffix = (f"_adapt{args.adapt}" if args.adapt else "") + (f"_ens{args.ensemble}" if args.ensemble > 1 else "")
    suffix += "_noshift" if args.ensemble > 1 and args.ensemble_shift == "off" else ""
    label = {"promptseg": f"promptseg{suffix}"}
    predictors = {label.get(name, name): makers[name]() for name in args.methods}
    report = evaluate(predictors, tasks, args.shots, args.episodes, queries=args.queries, seed=args.seed,
                      progress=not args.no_progress, prompt_kind=args.prompt_kind, query_prompts=args.query_prompts)
    for path, other in earlier:
        report = report.merged(other, path)
    print(report.to_markdown())
    if args.out:
        report.write(args.out)
    if args.markdown:
        write_text(args.markdown, report.to_markdown(), overwrite=args.overwrite)
    if args.plot:
        names = ", ".join(sorted({group for group, _ in report.tasks}))
        plot_dice_against_k(report, args.plot, f"mean Dice over tasks against K ({names})")
    return 0
