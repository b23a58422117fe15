"""A study on many processes: torchrun's group as a work queue (PyTorch's own distributed engine, no other).

    python al_loop.py ...                                   # a world of one: no process group, no store
    torchrun --nproc-per-node 8 al_loop.py ...              # 8 workers on one node
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 al_loop.py ...

The workers share --out on a shared file system and coordinate only through the group's key-value store:
an atomic counter hands out the units of work in a fixed order, a "stage/..." key names the one rank that
computes a stage several units share (the others run their other units first, then take its result), and a
"failed" key stops everyone when a worker fails. Which worker runs a unit never changes its result (every
unit seeds its own randomness).
When the store itself goes (torchrun's agent killed), each worker stops with one line and exit status 1.
"""
import os
import sys
import time
from datetime import timedelta

if "LOCAL_RANK" in os.environ:      # a torchrun worker: when the launcher dies, c10d's C++ warning (a stack trace)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")    # would bury this module's one-line message

import torch  # noqa: E402  (after the log level: torch reads it when it loads)
import torch.distributed as dist

from files import ProxyAlError


class StoreGone(ProxyAlError):
    """The group's store stopped answering: its host (torchrun's agent, or rank 0 without torchrun) is gone, and
    with it the group. main prints the one-line message, no traceback, and exits with status 1."""


class InFlight(Exception):
    """The unit needs a shared stage another rank is computing now: it goes to the back of this rank's queue."""


def unit_name(unit):
    """A queue unit (kind, seed, what) as the logs name it."""
    kind, seed, what = unit
    return f"unit {kind} seed {seed} {what or ''}"


class World:
    """This process's place in the group: rank, size, device index, and the shared queue."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.counters = {}                   # a world of one counts here
        self.store, self.store_gone = None, False
        self.deferring = False               # True while the queue has units left: a unit in flight elsewhere waits
        # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE) and is this process's parent; without
        # torchrun, rank 0 hosts it.
        self.agent = os.getppid() if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None
        if self.size > 1:
            # Keys carry the restart count: a restarted group starts a fresh queue (finished units are on disk).
            host = self.agent is None and self.rank == 0
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.size, host,
                                  timeout=timedelta(hours=2))
            self.store = dist.PrefixStore(f"proxy-al/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    store=dist.PrefixStore("group", self.store), rank=self.rank, world_size=self.size)

    def device(self, name):
        """--device for this rank: rank r takes cuda:(LOCAL_RANK % device count); several ranks may share one."""
        if self.size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return name

    def ask(self, method, *args):
        """self.store.<method>(*args), or StoreGone (one line, no traceback) when the store's host is gone: an agent
        that is no longer this process's parent (asked first: a call to a store that is gone makes torch print a
        C++ stack dump), or a lost connection (a broken pipe, a closed socket)."""
        if self.agent is not None and os.getppid() != self.agent:
            self.gone("its process ended")
        try:
            return getattr(self.store, method)(*args)
        except dist.DistNetworkError as err:
            self.gone(str(err).splitlines()[0] if str(err) else type(err).__name__)

    def gone(self, reason):
        """Stop this rank: the group's store is gone, and the group with it."""
        self.store_gone = True
        host = "the group's launcher (torchrun), which holds its store," if self.agent is not None else \
            "rank 0, which holds the group's store,"
        raise StoreGone(f"rank {self.rank} stops: {host} is gone ({reason}). Rerun the same command: it continues "
                        "from the saved stages")

    def add(self, key, amount=1):
        """Atomically add to a counter shared by the group; returns the new value."""
        if self.store is None:
            self.counters[key] = self.counters.get(key, 0) + amount
            return self.counters[key]
        return self.ask("add", key, amount)

    def claim(self):
        """The index of the next unit of work: each index goes to exactly one rank."""
        return self.add("next") - 1

    def set(self, key, value):
        if self.store is not None:
            self.ask("set", key, value)

    def get(self, key):
        """The value another rank set (waits for it)."""
        return self.ask("get", key).decode()

    def fail(self, message):
        """Tell every rank to stop (the first failure wins); nothing to tell once the store is gone."""
        if self.store is not None and not self.store_gone:
            self.ask("compare_set", "failed", "", message)

    def check(self):
        """Stop this rank if another one failed."""
        if self.store is not None and self.ask("check", ["failed"]):
            raise ProxyAlError(f"rank {self.rank} stops: {self.get('failed')}")

    def wait(self, ready, what, log, every_s=60.0):
        """Poll ready() until it holds; stop within a second of another rank's failure."""
        t0 = last = time.time()
        while not ready():
            self.check()
            if time.time() - last > every_s:
                log(f"waiting {time.time() - t0:.0f} s for {what}")
                last = time.time()
            time.sleep(0.2)

    def shared(self, name, find, log):
        """A stage that several units compute alike, `name` its identity: find()'s result (its saved weights) when
        it is done, or None when this rank is to compute it now (then tell the others with computed(name)). One
        rank computes it: while it does, another rank's unit that needs it waits at the back of that rank's queue
        (InFlight), and once nothing else is left it waits for the stage instead of computing it a second time."""
        if (found := find()) is not None or self.store is None:
            return found
        holder = self.ask("compare_set", f"stage/{name}", "", str(self.rank)).decode()
        if holder == str(self.rank):
            return None
        if self.deferring:
            raise InFlight(holder)
        self.wait(lambda: self.ask("check", [f"stage/{name}/done"]), f"rank {holder} to finish a shared stage", log)
        return find()               # None (not found after all): computed here, with the same result

    def computed(self, name):
        """The stage `name` this rank computed is saved (shared() of the other ranks finds it)."""
        self.set(f"stage/{name}/done", "1")

    def work(self, units, body, log=print):
        """Take units (kind, seed, what) from the shared queue until it is empty, body(*unit) for each this
        rank gets; a unit waiting for another rank's stage (InFlight) runs after the rest. A unit that fails stops
        every rank within a second, with a message naming rank and unit."""
        later, self.deferring = [], True
        while (i := self.claim()) < len(units):
            try:
                self.run_unit(units[i], body)
            except InFlight as busy:
                log(f"{unit_name(units[i])}: its stage is computed on rank {busy}; it runs later")
                later.append(i)
        self.deferring = False                  # nothing else left: a unit now waits for the stage it needs
        for i in later:
            self.run_unit(units[i], body)

    def run_unit(self, unit, body):
        """body(*unit); a failure (not InFlight, not the store's) is told to every rank, naming rank and unit."""
        self.check()
        try:
            body(*unit)
        except (InFlight, StoreGone):
            raise                               # not the unit's fault (StoreGone: no one left to tell)
        except BaseException as err:
            message = f"rank {self.rank} failed in {unit_name(unit)}: {err!r}"[:2000]
            if self.size > 1:
                print(message, file=sys.stderr, flush=True)
            self.fail(message)
            raise

    def close(self):
        if self.store is not None and not self.store_gone and dist.is_initialized():
            dist.destroy_process_group()
