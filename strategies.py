"""The strategies of the paper's supplementary Table 1 (and, beyond the paper, BALD and the all-data
reference), each parsed once from its name into a `Strategy` that the rest of the code asks.

    proxyrank_var_semi -> Strategy(proxy=True, acquisition="variance", semi=True)

Adding a strategy: its name, [proxyrank_]<score>[_semi], in EXTENDED. A new score (say margin), in three edits:
  1. proxy_al.mc_scores returns it: "margin" in the dict it returns (higher: annotate first);
  2. strategies.py names it: "margin" in MC_MEASURES, and "margin": "margin" in ACQUISITIONS;
  3. its strategies go in EXTENDED, e.g. "margin_semi" or "proxyrank_margin_semi".
Lines 4 and 9 rank by Strategy.measure and lines 12 and 15 by Strategy.acquisition: both follow the name.
"""
from dataclasses import dataclass

# The name's middle part -> how the strategy ranks the unlabeled pool at lines 13 and 16.
ACQUISITIONS = {"rand": "random", "var": "variance", "ent": "entropy", "bald": "bald"}
MC_MEASURES = ("variance", "entropy", "bald")      # scores of proxy_al.mc_scores

# Supplementary Table 1: the paper's 12.
PAPER = ("rand", "var", "ent", "var_semi", "ent_semi", "rand_semi", "proxyrank", "proxyrank_semi",
         "proxyrank_var", "proxyrank_var_semi", "proxyrank_ent", "proxyrank_ent_semi")
# Beyond the paper: mutual information (BALD), among the strongest scores for 3D segmentation (nnActive, 2025).
EXTENDED = PAPER + ("bald", "bald_semi", "proxyrank_bald", "proxyrank_bald_semi")
# The supplement's "model that is using all the data": Ms trained on the whole pool, the upper bound.
REFERENCE = "full"
# Beyond the paper, --query patch only: nnActive's foreground-favouring random boxes (its random-label: a
# centre anywhere, on foreground or on a class boundary, 1/3 each), on the annotation (an oracle: it reads
# labels no annotator has made yet, as nnActive's) or on the proxy's pseudo labels (no annotation needed).
FOREGROUND_RANDOM = {"rand_fg_oracle": "fg_oracle", "rand_fg_pseudo": "fg_pseudo"}
FOREGROUND_AREAS = "random-label"         # regions.AREAS


@dataclass(frozen=True)
class Strategy:
    name: str
    proxy: bool          # lines 2-4 rank the first pool, and Ms starts from Mp's weights
    acquisition: str     # "random", "fg_oracle", "fg_pseudo" (random boxes), "proxy" (the proxy ranking itself),
                         # "variance", "entropy", "bald", or "all"
    semi: bool           # lines 9-12: semi-supervised fine-tuning on the most certain unlabeled cases

    def __str__(self):
        return self.name

    @property
    def reference(self):
        """The all-data reference: no selection, Ms trained on the whole pool."""
        return self.acquisition == "all"

    @property
    def random(self):
        """Whether it acquires at random, without a model (lines 12 and 15)."""
        return self.acquisition in ("random", *FOREGROUND_RANDOM.values())

    @property
    def patch_only(self):
        """A random box baseline: it needs --query patch."""
        return self.name in FOREGROUND_RANDOM

    @property
    def oracle(self):
        """It reads pool labels before they are acquired (not possible in annotation mode)."""
        return self.acquisition == "fg_oracle"

    @property
    def areas(self):
        """The foreground-favouring rule of its random boxes (regions.AREAS), or None for uniform ones."""
        return FOREGROUND_AREAS if self.acquisition.startswith("fg_") else None

    @property
    def measure(self):
        """The MC score it ranks by where it needs an uncertainty (lines 3-4 and 9): its own, else variance."""
        return self.acquisition if self.acquisition in MC_MEASURES else "variance"

    @property
    def uses_mc(self):
        """Whether its acquisition scores the pool by MC dropout (lines 12 and 15)."""
        return self.acquisition in MC_MEASURES

    def iterations(self, iterations):
        """Its active iterations in a study of `iterations`: the reference trains once, on the whole pool."""
        return 1 if self.reference else iterations

    @property
    def cost(self):
        """Its relative time an active iteration, for the order of the queue (costliest first) and the study's ETA:
        1 for training Ms, +1 for MC acquisition, +3 for semi-supervision (its most certain cases scored by MC,
        then fine-tuning at 2.4x a supervised step). The real preset at 8 labeled, a rank of the 2-core CPU:
        var 10-11 min, proxyrank_var_semi 27 min."""
        return 1 + self.uses_mc + 3 * self.semi


def parse(name):
    """'proxyrank_var_semi' -> Strategy; ValueError naming the known ones for any other name."""
    if name == REFERENCE:
        return Strategy(name, proxy=False, acquisition="all", semi=False)
    if name in FOREGROUND_RANDOM:
        return Strategy(name, proxy=False, acquisition=FOREGROUND_RANDOM[name], semi=False)
    if name not in EXTENDED:
        raise ValueError(f"--strategy: unknown {name}; choose from all, extended, {', '.join(EXTENDED)}, {REFERENCE}, "
                         f"and with --query patch {', '.join(FOREGROUND_RANDOM)}")
    proxy, semi = name.startswith("proxyrank"), name.endswith("_semi")
    core = name.removeprefix("proxyrank").removesuffix("_semi").strip("_")
    return Strategy(name, proxy, ACQUISITIONS[core] if core else "proxy", semi)


def choose(spec):
    """The strategies a --strategy value names: all (the paper's 12), extended (+4 BALD), or NAME[,NAME...].
    `full` (the all-data reference) runs only when named, e.g. --strategy all,full."""
    names = []
    for part in (p.strip() for p in spec.split(",")):
        names += PAPER if part == "all" else EXTENDED if part == "extended" else [part] if part else []
    return [parse(n) for n in dict.fromkeys(names)]
