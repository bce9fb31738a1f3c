"""Command line: `python -m mipo_lib {setup,reproduce,tune,heldout,constraints,regime,ablation-choices,chat,readme,grade}`.

Any preset field can be changed with a repeatable `--set field=value` (parsed by the field's type: `beta=0.3`,
`load_in_4bit=true`, `cad_alpha=none`, `lora_target_modules=q_proj,v_proj`, `seeds=0,1`); `reproduce` hands the same
overrides to every notebook. The help of each command that takes `--set` lists every field with its type, default
and meaning; `reproduce`, `tune`, `heldout` and `regime` print each value that differs from the preset as written, with where
it came from, before they start. User mistakes (unknown preset or field, a value of the wrong type or out of range,
offline hub id, no 4-bit backend) print one line starting with `error:` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers like '0,1,2', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["grade"]:  # its own options: python -m mipo_lib grade --help
        from mipo_lib.workbook.grade import main as grade

        return grade(argv[1:])
    from mipo_lib.config import PRESETS, fields_help

    parser = argparse.ArgumentParser(prog="python -m mipo_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # the commands that take --set end their help with every preset field (RawDescription keeps its layout)
    with_fields = {"epilog": fields_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}

    sub.add_parser("grade", help="grade a class's exercises into a CSV: python -m mipo_lib grade SUBMISSIONS/ --out grades.csv")
    sub.add_parser("setup", help="convert the bundled SmolLM2 to a cached checkpoint and build the tiny smoke model")

    rep = sub.add_parser("reproduce", help="run the numbered notebooks with papermill for a preset", **with_fields)
    rep.add_argument("--seeds", type=_parse_seeds, default=None, help="e.g. 0,1,2 (default: the preset's seeds)")
    rep.add_argument("--notebooks", nargs="*", default=None, help="prefixes such as 01 03, or all (default: 00-05; the ablations 06 are opt-in)")
    rep.add_argument("--redo", action="store_true", help="recompute pairs, adapters and evaluations")
    rep.add_argument("--no-progress", action="store_true")

    tun = sub.add_parser("tune", help="choose epochs and learning rates (MIPO, SFT) and CAD's strength on validation",
                         **with_fields)
    tun.add_argument("--seeds", type=_parse_seeds, default=None, help="tuning seeds (default: the preset's)")
    tun.add_argument("--no-progress", action="store_true")
    tun.add_argument("--rechoose", action="store_true",
                     help="no sweep: re-apply the choice rule to the committed figures/tuning_<preset>.csv and rewrite "
                          "figures/choices_<preset>.csv (and heldout_choices_<preset>.csv from its sweep, if committed)")

    held = sub.add_parser("heldout", help="MIPO vs prompting on preference types never trained on -> figures/heldout_types_<preset>.csv",
                          **with_fields)
    held.add_argument("--seeds", type=_parse_seeds, default=None, help="MIPO seeds (default: the preset's first)")
    held.add_argument("--no-progress", action="store_true")

    neg = sub.add_parser("constraints", help="prompting, SFT and MIPO's stored adapters on test-only negative "
                         "constraints ('do not mention coffee') -> figures/negative_constraints_<preset>.csv",
                         **with_fields)
    neg.add_argument("--seeds", type=_parse_seeds, default=None, help="adapters' seeds (default: the preset's)")
    neg.add_argument("--no-progress", action="store_true")
    reg = sub.add_parser("regime", help="the paper's regime (MIPO at 1 epoch; full fine-tuning) vs prompting -> "
                                        "figures/regime_<preset>.csv", **with_fields)
    reg.add_argument("--seeds", type=_parse_seeds, default=None, help="seeds (default: the preset's; the first tunes)")
    reg.add_argument("--add-seeds", action="store_true", help="train and evaluate the committed choices on --seeds the "
                     "committed records lack and add them (no sweep; the committed seeds are kept)")
    reg.add_argument("--sweep-only", action="store_true", help="sweep and choose again on validation, training only "
                     "what the committed sweeps lack; write the sweep and choices (nothing evaluated on the test prompts)")
    reg.add_argument("--no-progress", action="store_true")
    abl = sub.add_parser("ablation-choices", help="each ablation variant's epochs chosen on validation (seed 0) -> "
                                                  "figures/ablation_choices_<preset>.csv, which notebook 06 reads",
                         **with_fields)
    abl.add_argument("--no-progress", action="store_true")

    rdm = sub.add_parser("readme", help="re-render the generated blocks and spans of README.md, docs/ and the notebooks' prose from the committed tables")
    rdm.add_argument("--preset", default="all", help="cpu, cpu-reasoning or all (default)")

    chat = sub.add_parser("chat", help="one reply from a preset's base model (a quick check that loading works)",
                          **with_fields)
    chat.add_argument("message")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    for command in (rep, chat, tun, held, neg, reg, abl):
        command.add_argument(
            "--set", action="append", default=[], dest="overrides", metavar="FIELD=VALUE",
            help="change one preset field, e.g. --set beta=0.3 (repeatable; every field is listed below)",
        )
        command.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (default: cpu)")

    args = parser.parse_args(argv)
    from mipo_lib.errors import MipoError

    try:
        from mipo_lib.config import parse_assignments

        overrides = parse_assignments(getattr(args, "overrides", []))
        if args.command == "setup":
            from mipo_lib.models import bundled_checkpoint, tiny_checkpoint

            print(f"bundled SmolLM2 checkpoint: {bundled_checkpoint()}")
            print(f"tiny smoke model: {tiny_checkpoint()}")
        elif args.command == "reproduce":
            from mipo_lib.workbook.runner import reproduce

            reproduce(args.preset, args.seeds, args.notebooks, args.redo, progress=not args.no_progress, overrides=overrides)
        elif args.command == "tune" and args.rechoose:
            from mipo_lib.config import choices_path
            from mipo_lib.experiments import heldout, tune

            pairs = [(tune.tuning_path(args.preset), choices_path(args.preset)),
                     (heldout.tuning_path(args.preset), heldout.choices_path(args.preset))]
            for i, (tuning, choices) in enumerate(pairs):
                if i == 0 or choices.exists():
                    print(f"{choices.name} from {tuning.name}:")
                    print(tune.rechoose(tuning, choices).drop(columns=["tuned_under", "rule"]).to_string(index=False))
        elif args.command == "tune":
            from mipo_lib.experiments.tune import run
            from mipo_lib.workbook.runner import say_settings

            say_settings(args.preset, overrides, tuned=False)  # the sweep starts from the preset as written
            summary, choices = run(args.preset, args.seeds, overrides, progress=not args.no_progress)
            print(summary.to_string(index=False))
            print(choices.to_string(index=False))
        elif args.command == "heldout":
            from mipo_lib.experiments.heldout import records_path, run as run_heldout
            from mipo_lib.workbook.runner import say_settings

            say_settings(args.preset, overrides)
            frame = run_heldout(args.preset, args.seeds, overrides, progress=not args.no_progress)
            rates = frame.groupby(["method", "seed"])[["score", "truncated"]].mean()
            print(rates.to_string(float_format="{:.3f}".format))
            print(f"wrote {records_path(args.preset)}")
        elif args.command == "constraints":
            from mipo_lib.experiments import constraints
            from mipo_lib.workbook.runner import say_settings

            say_settings(args.preset, overrides)
            records, table, seconds = constraints.run(args.preset, overrides, args.seeds, progress=not args.no_progress)
            print(constraints.per_constraint(records).to_string(index=False, float_format="{:.3f}".format))
            diffs = table[table["kind"] == "paired_difference"]
            print(diffs[["method", "baseline", "ci_design", "rate", "baseline_rate", "diff", "diff_lo", "diff_hi",
                         "p_holm"]].to_string(index=False, float_format="{:.3f}".format))
            print(f"wrote {constraints.records_path(args.preset)} and {constraints.results_path(args.preset).name} "
                  f"in {seconds:.0f} s")
        elif args.command == "regime":
            from mipo_lib.experiments.regime import records_path, run as run_regime
            from mipo_lib.workbook.runner import say_settings

            say_settings(args.preset, overrides)
            if args.add_seeds:
                from mipo_lib.experiments.regime import add_seeds

                if not args.seeds:
                    raise MipoError("--add-seeds needs --seeds, the seeds to add (e.g. --seeds 3,4)")
                _, table, costs = add_seeds(args.preset, args.seeds, overrides, progress=not args.no_progress)
            elif args.sweep_only:
                from mipo_lib.experiments.regime import choices_path, choose_again

                choices, stale, costs = choose_again(args.preset, args.seeds, overrides, progress=not args.no_progress)
                for c in choices:
                    print(f"{c['regime']}: {c['epochs']} epoch(s) at learning rate {c['learning_rate']:g} (validation "
                          f"{c['validation_rate']:.1%}; best {c['best_rate']:.1%}, se {c['se']:.1%}; grid epochs "
                          f"{c['epoch_grid']})")
                for cost in costs:
                    print(cost)
                print(f"wrote {choices_path(args.preset)}; the committed test records "
                      + (f"no longer match: {stale}" if stale else "still match these choices"))
                return 0
            else:
                _, table, costs = run_regime(args.preset, args.seeds, overrides, progress=not args.no_progress)
            print(table[table["kind"] == "paired_difference"].to_string(index=False))
            for cost in costs:
                print(cost)
            print(f"wrote {records_path(args.preset)}")
        elif args.command == "ablation-choices":
            from mipo_lib.config import get_preset
            from mipo_lib.experiments import ablation_epochs, ablations
            from mipo_lib.workbook.runner import say_settings

            say_settings(args.preset, overrides)
            preset = get_preset(args.preset, **overrides)
            table = ablation_epochs.run(preset, ablations.tunable_variants(preset), progress=not args.no_progress)
            print(table.drop(columns=["key", "rule"]).to_string(index=False))
            print(f"wrote {ablation_epochs.choices_path(args.preset)}")
        elif args.command == "readme":
            from mipo_lib.workbook.readme import update_readme

            from mipo_lib.workbook.readme import REFERENCE_TABLES

            for name in [args.preset] if args.preset != "all" else list(REFERENCE_TABLES):
                print(f"{name}: README, docs/ and notebook prose " + ("updated" if update_readme(name) else "already up to date"))
        elif args.command == "chat":
            from mipo_lib.config import get_preset
            from mipo_lib.generate import chat_reply
            from mipo_lib.models import load_for_preset

            model, tokenizer = load_for_preset(get_preset(args.preset, **overrides))
            print(chat_reply(model, tokenizer, args.message, max_new_tokens=args.max_new_tokens))
    except MipoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
