"""`promptseg eval`: Dice per dataset, label and K for the model and the two baselines on the same
episodes."""

from __future__ import annotations

import argparse

from promptseg.cli.commands import COMMANDS
from promptseg.cli.common import resolve_device
from promptseg.cli.train import dataset_folders
from promptseg.data.index import CASE_SETS, build_tasks
from promptseg.engine.adaptation import MAX_ADAPT_STEPS, Adaptation
from promptseg.engine.ensemble import MAX_ENSEMBLE
from promptseg.errors import InputError
from promptseg.eval.baselines import (
    FineTunedUNetBaseline,
    ModelPredictor,
    NearestPromptBaseline,
)
from promptseg.eval.evaluate import EvalReport, evaluate
from promptseg.eval.interactive import CAP, CORRECTION_MODES, USERS, run_interactive
from promptseg.eval.plot import plot_dice_against_k, require_matplotlib
from promptseg.files import refuse_existing, write_text
from promptseg.model.weights import load_model, packaged_weights_path

METHODS = ("promptseg", "nearest_prompt", "finetuned_unet")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help=COMMANDS["eval"].help,
        description="Dice (mean and std over fixed-seed episodes) per dataset, label and number of "
        "prompts K, "
        "for the model, a nearest-prompt label copy and a small U-Net fine-tuned on the K prompts.",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="DIR",
        help="dataset folders, or folders of them",
    )
    parser.add_argument(
        "--cases",
        choices=CASE_SETS,
        default="all",
        help="score every case (held-out datasets), or only the fixed 20%% case split that "
        "`promptseg train` leaves out ('held': fit on unseen cases of training datasets; "
        "'held-queries': those cases queried, prompted from the training cases) (default all)",
    )
    parser.add_argument(
        "--cache", metavar="DIR", help="packed dataset cache (as for promptseg train)"
    )
    parser.add_argument(
        "--axis",
        type=int,
        default=2,
        choices=(0, 1, 2),
        help="array axis along which 3D cases are sliced into examples, as stored (2: axial for "
        "most NIfTI datasets; as for promptseg train)",
    )
    parser.add_argument(
        "--shots",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8, 16],
        metavar="K",
        help="numbers of prompts K to score each task with",
    )
    parser.add_argument(
        "--episodes", type=int, default=20, metavar="N", help="prompt draws per task and K"
    )
    parser.add_argument("--queries", type=int, default=4, help="queries per episode")
    parser.add_argument(
        "--prompt-kind",
        choices=("mask", "click", "box", "scribble"),
        default="mask",
        help="prompt every episode with its masks (default) or with one click, box or scribble "
        "per prompt image, drawn from the mask",
    )
    parser.add_argument(
        "--query-prompts",
        action="store_true",
        help="score the prompted images themselves (interactive use) instead of other queries",
    )
    parser.add_argument(
        "--adapt",
        type=int,
        default=0,
        metavar="STEPS",
        help="test-time adaptation: fit the model's normalisation scales and output head to each "
        "episode's prompts for STEPS leave-one-out steps first (reported as promptseg_adaptSTEPS; "
        f"0..{MAX_ADAPT_STEPS}, default 0: off)",
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="average the model over N ensemble members per episode: drop-one prompt subsets, "
        "then "
        f"flips, calibrated on the prompts they leave out (1..{MAX_ENSEMBLE}, default 1: off; "
        "reported as promptseg_ensN)",
    )
    parser.add_argument(
        "--interactive",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="simulate a user correcting the model's prediction: ROUNDS clicks, "
        "each at the centre of the largest error region; reports Dice per round "
        "and clicks to 90%% Dice (capped at 20) for the model at the first --shots "
        "K (promptseg.eval.interactive)",
    )
    parser.add_argument(
        "--interactive-corrections",
        choices=CORRECTION_MODES,
        default=None,
        help="with --interactive, how a click corrects: edit (a local edit of the probabilities), "
        "model (the query segmented again with every click so far as input: a model trained with "
        "query corrections), both (the two joined in logit space, as segment --correct does "
        "with such a model); default: both for such a model, else edit",
    )
    parser.add_argument(
        "--interactive-user",
        choices=USERS,
        default="click",
        help="with --interactive, what the simulated user adds each round: a click at the centre "
        "of the largest error region (default) or a scribble, a straight stroke through it along "
        "its long axis over its core",
    )
    parser.add_argument(
        "--ensemble-shift",
        choices=("on", "off"),
        default="on",
        help="with --ensemble: move the mask threshold by the logit shift that scores best on the "
        "prompts the members leave out, and divide the members' logits by the temperature that "
        "fits "
        "those prompts best (on, default), or neither (off, the averaging alone; reported as "
        "promptseg_ensN_noshift); the probabilities are never shifted",
    )
    parser.add_argument(
        "--checkpoint", metavar="FILE", help="weights (default: the packaged weights)"
    )
    parser.add_argument("--out", metavar="FILE.json", help="write the full report as JSON")
    parser.add_argument("--markdown", metavar="FILE.md", help="also write the table as markdown")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw mean Dice over tasks against K, one line per method with the spread over "
        "episodes as a band (needs matplotlib: pip install 'promptseg[plot]')",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing --out, --markdown and --plot files",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="NAME",
        help=f"methods to score: {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="FILE.json",
        help="add the methods and tasks of earlier reports drawn with the same --episodes, "
        "--queries, "
        "--seed and --shots (e.g. baselines scored once, or datasets scored in parallel)",
    )
    parser.add_argument(
        "--unet-steps", type=int, default=60, help="fine-tuning budget of the U-Net baseline"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the episodes (which prompts and queries are drawn) and of the U-Net baseline",
    )
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def check_output_files(paths: list[str | None], overwrite: bool) -> None:
    """InputError naming the first output path that is a folder, or that exists without `overwrite`
    (checked before anything is scored)."""
    refuse_existing([path for path in paths if path is not None], overwrite)


def run(args: argparse.Namespace) -> int:
    if any(k < 1 for k in args.shots):
        raise InputError("--shots", f"each K must be positive, got {args.shots}")
    if not 0 <= args.adapt <= MAX_ADAPT_STEPS:
        raise InputError("--adapt", f"must lie in 0..{MAX_ADAPT_STEPS}, got {args.adapt}")
    if not 1 <= args.ensemble <= MAX_ENSEMBLE:
        raise InputError("--ensemble", f"must lie in 1..{MAX_ENSEMBLE}, got {args.ensemble}")
    if args.episodes < 1:
        raise InputError("--episodes", f"must be positive, got {args.episodes}")
    if args.queries < 1:
        raise InputError("--queries", f"must be positive, got {args.queries}")
    if not 0 <= args.interactive <= CAP:
        raise InputError("--interactive", f"must lie in 0..{CAP} rounds, got {args.interactive}")
    check_output_files([args.out, args.markdown, args.plot], args.overwrite)
    if args.plot:
        require_matplotlib("--plot")  # before anything is scored
    device = resolve_device(args.device)
    model = load_model(args.checkpoint or packaged_weights_path()).to(device)
    limit = model.config.max_prompts
    if any(k > limit for k in args.shots):  # before any dataset is read
        raise InputError(
            "--shots", f"each K must lie in 1..{limit} (the model's prompt limit), got {args.shots}"
        )
    tasks = build_tasks(
        dataset_folders(args.data, []),
        model.config.resolution,
        model.config.in_channels,
        axis=args.axis,
        progress=not args.no_progress,
        cache_dir=args.cache,
        cases=args.cases,
    )
    if not tasks:
        raise InputError(" ".join(args.data), "no task with enough annotated examples")
    if args.interactive:
        if args.interactive_corrections is None:
            args.interactive_corrections = "both" if model.config.query_corrections else "edit"
        if args.interactive_corrections != "edit" and not model.config.query_corrections:
            raise InputError(
                "--interactive-corrections",
                f"{args.interactive_corrections} needs a model trained with query corrections",
            )
        return run_interactive(args, ModelPredictor(model, device), tasks)
    earlier = [(path, EvalReport.load(path)) for path in args.merge]
    adaptation = Adaptation(args.adapt, seed=args.seed) if args.adapt else None
    makers = {
        "promptseg": lambda: ModelPredictor(
            model, device, adaptation, args.ensemble, args.ensemble_shift == "on"
        ),
        "nearest_prompt": NearestPromptBaseline,
        "finetuned_unet": lambda: FineTunedUNetBaseline(steps=args.unet_steps, seed=args.seed),
    }
    planned = {
        "episodes": args.episodes,
        "queries": args.queries,
        "seed": args.seed,
        "shots": list(args.shots),
        "prompt_kind": args.prompt_kind,
        "query_prompts": args.query_prompts,
    }
    for path, other in earlier:
        other.check_same_episodes(planned, path)
    suffix = (f"_adapt{args.adapt}" if args.adapt else "") + (
        f"_ens{args.ensemble}" if args.ensemble > 1 else ""
    )
    suffix += "_noshift" if args.ensemble > 1 and args.ensemble_shift == "off" else ""
    label = {"promptseg": f"promptseg{suffix}"}
    predictors = {label.get(name, name): makers[name]() for name in args.methods}
    report = evaluate(
        predictors,
        tasks,
        args.shots,
        args.episodes,
        queries=args.queries,
        seed=args.seed,
        progress=not args.no_progress,
        prompt_kind=args.prompt_kind,
        query_prompts=args.query_prompts,
        channels=model.config.in_channels,
    )
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
