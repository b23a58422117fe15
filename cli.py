"""The command line: a --flag per Config field (its help and its check stand next to the field, in
al_loop.py), every option checked before any data is read, and the actions that are not settings
(--report, --rebuild-state, --export-nnunet).
"""
import argparse
import dataclasses
import os
import re
import sys
from dataclasses import field


def opt(default, help, check=None, only=None):
    """A Config field: its default, the one line of --help that documents it, its check: (ok(value) -> bool, what
    a valid value is), and `only`: (field, value) when the setting means something only then (e.g. ("query",
    "patch")): given otherwise, it is refused; a rerun does not compare it while it means nothing."""
    return field(default=default, metadata={"help": help, "check": check, "only": only})


def moot(cfg) -> set:
    """The settings that mean nothing under cfg (their field's `only` condition does not hold)."""
    return {f.name for f in dataclasses.fields(cfg) if f.metadata.get("only")
            and getattr(cfg, f.metadata["only"][0]) != f.metadata["only"][1]}


def format_warning(message, category, filename, lineno, line=None):
    """A warning as users read it: its message, without the Python source line that raised it."""
    return f"warning: {message}\n"


def at_least(n):
    return lambda v: v >= n, f"must be at least {n}" if n else "must be >= 0"


def within(lo, hi, lo_open=False, hi_open=False):
    ok = lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return ok, f"must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def one_of(*choices):
    return lambda v: v in choices, " or ".join(choices)


def _lo_hi(values):
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        return False
    return lo < hi


LO_HI = (_lo_hi, "two numbers LO,HI with LO < HI, e.g. -21,189")
SIDES = (lambda v: len(v) == 3 and all(s > 0 and s % 16 == 0 for s in v),
         "three sides, each a positive multiple of 16 (the U-Net halves a patch four times)")


def fmt(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_parser(cls, presets, description):
    """An argparse parser with one --flag per field of the dataclass `cls` (unset flags parse to None).

    Each flag's help is its field's metadata["help"], followed by its value in every preset.
    Shared with benchmarks/bench.py.
    """
    show = lambda v: fmt(v) if v != "" else '""'
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        values = ", ".join(f"{name}: {show(getattr(preset, f.name))}" for name, preset in presets.items())
        text = f"{f.metadata.get('help', '')} [{values}]".replace("%", "%%")
        if isinstance(f.default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None, help=text)
        else:
            kind = "LIST" if isinstance(f.default, tuple) else type(f.default).__name__.upper()
            p.add_argument("--" + f.name.replace("_", "-"), default=None, metavar=kind, help=text)
    return p


def config_values(cls, args, parser):
    """{field: value} of the flags that were given (args: vars of the parsed namespace), each converted to
    its field's type; a value that does not convert is a parser error naming the flag."""
    kinds = {f.name: f.default for f in dataclasses.fields(cls)}
    given = {}
    for name, text in args.items():
        if name not in kinds or text is None:
            continue
        default = kinds[name]
        try:
            if isinstance(default, tuple):
                given[name] = tuple(float(x) if "." in x else int(x) for x in text.split(",") if x.strip())
            else:
                given[name] = type(default)(text)        # a bool flag arrives as True
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} {text!r}: expected {type(default).__name__}")
    return given


def join_negative_values(argv):
    """`--window-hu -21,189` as `--window-hu=-21,189`: argparse would take a value that starts with '-' and is
    not a plain number for a flag."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] is None:              # the value just joined to the flag before it
            continue
        if out[i].startswith("--") and "=" not in out[i] and re.fullmatch(r"-[\d.]+(,-?[\d.]+)+", out[i + 1]):
            out[i], out[i + 1] = f"{out[i]}={out[i + 1]}", None
    return [a for a in out if a is not None]


def add_actions(p):
    """What a command does besides running the study; none of it is a setting."""
    g = p.add_argument_group("actions (not settings)")
    g.add_argument("--report", action="store_true", help="only write the reports of --out from its state so far "
                   "(also while it runs)")
    g.add_argument("--rebuild-state", action="store_true", help="set aside unreadable state files and rebuild them "
                   "from the checkpoints")
    g.add_argument("--export-nnunet", type=int, metavar="ID", help="write the cases a strategy had labeled as the "
                   "nnU-Net raw dataset DatasetID_<name> (under $nnUNet_raw or --export-to), then stop")
    g.add_argument("--seed", type=int, help="--export-nnunet: the seed (default: the run's only one)")
    g.add_argument("--iteration", type=int, metavar="J", help="--export-nnunet: the cases iteration J (from 1) "
                   "trained on (default: every case the run has labeled, the last round's annotations too)")
    g.add_argument("--export-to", default="", help="--export-nnunet: the folder to write into (default: $nnUNet_raw)")
    g.add_argument("--overwrite", action="store_true", help="--export-nnunet: replace an existing dataset folder")
    g.add_argument("--boxes-done", default="", metavar="CASE[,CASE...]", help="annotation with boxes (--query "
                   "patch): the boxes asked in these cases (or all) are labeled as saved, also where no voxel "
                   "changed (a box that is truly all background)")
    return p


def parse_args(cls, presets, description, argv=None):
    """(Config from the command line, the actions): unset flags keep the preset's value. The preset is
    --preset, else demo without --data and paper with it."""
    p = add_actions(config_parser(cls, presets, description))
    args = vars(p.parse_args(join_negative_values(argv if argv is not None else sys.argv[1:])))
    actions = {k: args.pop(k) for k in ("report", "rebuild_state", "export_nnunet", "seed", "iteration", "export_to",
                                        "overwrite", "boxes_done")}
    given = config_values(cls, args, p)
    if "data_root" not in given and os.environ.get("MSD_DATA_ROOT"):
        given["data_root"] = os.environ["MSD_DATA_ROOT"]
    preset = given.pop("preset", "") or ("paper" if given.get("data", "demo") != "demo" else "demo")
    if preset not in presets:
        p.error(f"--preset {preset}: choose one of {', '.join(presets)}")
    if (actions["report"] or actions["export_nnunet"] is not None) and not given.get("out"):
        p.error("--report and --export-nnunet need --out: the run folder to read")
    if actions["export_nnunet"] is None and (actions["seed"] is not None or actions["iteration"] is not None):
        p.error("--seed and --iteration choose what --export-nnunet exports; the study's seeds are --seeds")
    actions["boxes_done"] = tuple(c.strip() for c in actions["boxes_done"].split(",") if c.strip())
    if actions["boxes_done"] and given.get("query", presets[preset].query) != "patch":
        p.error("--boxes-done confirms boxes of annotation with boxes: it needs --query patch")
    actions = argparse.Namespace(**actions, default_strategy="strategy" not in given, given=set(given))
    cfg = dataclasses.replace(presets[preset], preset=preset, **given)
    for name in moot(cfg) & set(given):
        when = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(name)].metadata["only"]
        p.error(f"--{name.replace('_', '-')} {fmt(given[name])}: used only with --{when[0].replace('_', '-')} "
                f"{when[1]} (this run has --{when[0].replace('_', '-')} {getattr(cfg, when[0])}); drop it, or add "
                f"--{when[0].replace('_', '-')} {when[1]}")
    return cfg, actions


def check_options(cfg):
    """Every field's own check, and the device; all problems in one message (before any data is read)."""
    import torch
    problems = []
    for f in dataclasses.fields(cfg):
        check, value = f.metadata.get("check"), getattr(cfg, f.name)
        if check and not check[0](value):
            problems.append(f"--{f.name.replace('_', '-')} {fmt(value)}: {check[1]}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {cfg.device}: this PyTorch sees no CUDA device (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda}); use --device cpu or auto, or install a CUDA build")
    elif cfg.device.startswith("cuda:") and not (cfg.device[5:].isdigit()
                                                 and int(cfg.device[5:]) < torch.cuda.device_count()):
        problems.append(f"--device {cfg.device}: there are {torch.cuda.device_count()} CUDA devices")
    if problems:
        raise SystemExit("invalid options:\n  " + "\n  ".join(problems))
