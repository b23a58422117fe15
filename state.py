"""The state of one (seed, strategy) of a run: Tl in the order its units joined it (units.py) and a Record per
finished active iteration. Its file form, state/seed<S>_<strategy>.json, is JSON with units as text; this module
is the one place that writes, checks and reads it. Everything else works on the dataclasses.
"""
import math
from dataclasses import dataclass, field, fields

import units

DICE_KEYS = ("dice", "mean_dice", "per_case")        # what validate() gives: a Record's Dice, and its test Dice


@dataclass
class Record:
    """One finished active iteration (line 18): what Ms (or Msemi) trained on and its Dice, and the units lines
    12-16 acquired after it. Saved with these keys in this order, those that are None left out."""
    n_labeled: int                   # |Tl| it trained on
    dice: list                       # validation Dice per foreground class (NaN: no validation case has the class)
    mean_dice: float                 # MONAI's mean_dice: per case the mean of its present classes, then over cases
    per_case: dict                   # {case: [Dice per foreground class]}
    voxels: int = None               # voxels annotated so far on the training grids, and the foreground among them
    fg_voxels: int = None
    pool_voxels: int = None          # --query patch: the pool's voxels (results.csv's pct_labeled is their share)
    certain: list = None             # line 9: Un, the most certain units (a _semi strategy; [] when lines 9-11 skip)
    test: dict = None                # --n-test: {"dice", "mean_dice", "per_case"} of the test cases
    acquired: list = None            # lines 12-16: the units acquired after it
    scores: dict = None              # {unit: score} that acquired them (volume mode: every unlabeled case's)
    extra: dict = field(default_factory=dict, repr=False)      # keys of another proxy-al, kept as they were

    ORDER = ("n_labeled", "voxels", "fg_voxels", "pool_voxels", "certain", "dice", "mean_dice", "per_case", "test",
             "acquired", "scores")

    def acquire(self, acquired, scores):
        """Lines 13 and 16: the units acquired after this iteration, and the scores that chose them."""
        self.acquired, self.scores = list(acquired), dict(scores)

    @property
    def final_stage(self) -> str:
        """The checkpoint its final model is in: Msemi ("semi") where lines 9-11 ran, else Ms ("sup")."""
        return "semi" if self.certain else "sup"

    def with_test_dice(self):
        """This record with its test Dice (--n-test) in place of the validation Dice (NaN without one)."""
        test = self.test or {"dice": [math.nan] * len(self.dice), "mean_dice": math.nan, "per_case": {}}
        return Record(**{f.name: getattr(self, f.name) for f in fields(self)} | {k: test[k] for k in DICE_KEYS})

    def to_json(self) -> dict:
        out = {}
        for key in self.ORDER:
            value = getattr(self, key)
            if value is not None:
                out[key] = ([str(u) for u in value] if key in ("certain", "acquired") else
                            {str(u): s for u, s in value.items()} if key == "scores" else value)
        return out | self.extra

    @classmethod
    def from_json(cls, obj, j=0):
        """A Record from its JSON object (iteration j from 0, for the message); ValueError saying what is wrong."""
        if not (isinstance(obj, dict) and isinstance(obj.get("n_labeled"), int) and isinstance(obj.get("dice"), list)
                and isinstance(obj.get("mean_dice"), (int, float)) and isinstance(obj.get("per_case"), dict)
                and isinstance(obj.get("acquired", []), list) and isinstance(obj.get("certain", []), list)
                and isinstance(obj.get("scores", {}), dict)):
            raise ValueError(f"iteration {j + 1} is not a record with n_labeled, dice, mean_dice, per_case")
        known = {k: obj[k] for k in cls.ORDER if k in obj}
        for key in ("certain", "acquired"):
            if key in known:
                known[key] = _units(known[key], f"iteration {j + 1}: '{key}'")
        if "scores" in known:
            known["scores"] = {units.parse(u): s for u, s in known["scores"].items()}
        return cls(**known, extra={k: v for k, v in obj.items() if k not in cls.ORDER})


@dataclass
class RunState:
    """One (seed, strategy) of a run, saved as state/seed<S>_<strategy>.json with these keys in this order."""
    given: list = field(default_factory=list)       # pool cases labeled when the run began: in Tl from the start
    initial: list = field(default_factory=list)     # line 5's selection
    labeled: list = field(default_factory=list)     # Tl, in the order its units joined it
    iterations: list = field(default_factory=list)  # a Record per finished iteration
    scores: dict = field(default_factory=dict)      # the score that selected each unit

    @property
    def trained(self) -> list:
        """The units of Tl the last finished iteration trained on (before one: the given cases)."""
        return self.labeled[:self.iterations[-1].n_labeled if self.iterations else len(self.given)]

    def to_json(self) -> dict:
        text = lambda us: [str(u) for u in us]
        return {"given": text(self.given), "initial": text(self.initial), "labeled": text(self.labeled),
                "iterations": [r.to_json() for r in self.iterations],
                "scores": {str(u): s for u, s in self.scores.items()}}

    @classmethod
    def from_json(cls, obj):
        """A RunState from a state file's object; ValueError saying what is wrong. An older proxy-al's state
        without 'given' or 'initial' gets [] and None (RunFolder.state rebuilds its line 5 from 'labeled')."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        lists = {k: _units(obj[k], f"'{k}'") for k in ("given", "initial", "labeled") if k in obj}
        if "labeled" not in lists:
            raise ValueError("'labeled' must be a list of case ids")
        if not isinstance(obj.get("scores"), dict):
            raise ValueError("'scores' must be an object {case: score}")
        if not isinstance(obj.get("iterations"), list):
            raise ValueError("'iterations' must be a list")
        return cls(given=lists.get("given", []), initial=lists.get("initial"), labeled=lists["labeled"],
                   iterations=[Record.from_json(r, j) for j, r in enumerate(obj["iterations"])],
                   scores={units.parse(u): s for u, s in obj["scores"].items()})


def _units(values, what):
    if not (isinstance(values, list) and all(isinstance(u, str) for u in values)):
        raise ValueError(f"{what} must be a list of case ids")
    return [units.parse(u) for u in values]
