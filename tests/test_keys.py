"""keys.py: a stage's names and seeds from one owner, equal to the strings earlier run folders hold (a rename would
orphan their checkpoints and change every result)."""
import zlib

from keys import Key, map_seed, mc_seed, stage_seed


def crc(text):
    return zlib.crc32(text.encode())


def test_names_are_the_run_folders():
    key = Key(0, "proxyrank_var", 1)
    assert str(key) == "seed0/proxyrank_var/iter1" and key.checkpoint("sup") == "seed0/proxyrank_var/iter1_sup"
    assert Key(2).checkpoint() == "seed2/proxy" and key.folder == "seed0_proxyrank_var_iter1"
    assert key.scoring() == "seed0/proxyrank_var/iter1"
    assert key.scoring("certain") == "seed0/proxyrank_var/iter1/certain"


def test_seeds_are_crc32_of_the_names():
    key = Key(1, "rand", 0)
    assert stage_seed(1, "proxy") == Key(1).of_seed("proxy") == crc("1/proxy")
    assert key.paired("sup", "a", "b") == crc("seed1/sup/a/b") and key.paired("init") == crc("seed1/init")
    assert mc_seed(key.scoring("certain"), "c") == crc("seed1/rand/iter0/certain/mc/c")
    assert key.model_seed("semi") == crc("seed1/rand/iter0_semi")
    assert map_seed("to_annotate", "c") == crc("to_annotate/c/map")
    assert Key(1, "var", 0).paired("sup", "a") == key.paired("sup", "a")        # paired: the seed's strategies share it
