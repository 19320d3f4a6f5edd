"""How training workers cooperate. An algorithm is handed one strategy and never asks more.

The algorithm calls ``reduce_gradients(params, samples)`` between ``backward()`` and
gradient clipping (``params``: what the next optimizer step updates), and
``step(optimizer)`` where a lone learner would call ``optimizer.step()``. An algorithm may
have several optimizers (actor, critics, temperature): each pair of calls is about one of
them, and every worker makes them in the same order. ``start`` is given the algorithm's
``optimizers()`` dict, whose order names them on the wire. A third hook,
``merge_statistics(normalizer)``, called after every update, folds the observation and
return statistics the workers gathered since the last merge into the ones they all use
(``shoal.normalize``). Each strategy is an implementation of these hooks:

- ``LocalStrategy``: one learner; ``step`` is ``optimizer.step()``; statistics merged after
  every update.
- ``SyncStrategy`` (``sync``): gradients all-reduced (DD-PPO, sync SGD); weights never drift;
  every worker's new statistics merged after every update.
- ``ParamAvgStrategy`` (``param-avg``): local steps, parameters averaged every K steps, and
  the new statistics merged with each average.
- ``ServerStrategy`` (``a3c``, ``param-server``): gradients pushed to the global model held
  by a parameter server (``shoal.distributed.server``), fresh weights pulled back; new
  statistics travel with each push, the server's merged ones come back with the answer.

Workers ``0 .. world_size - 1`` form a torch.distributed group (gloo on CPU); with a
parameter server each worker talks to it over a link of its own (``shoal.distributed.link``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn, optim

from shoal import guards
from shoal.distributed import wire
from shoal.distributed.compress import Compressor

if TYPE_CHECKING:  # a link is made by the launcher; importing an algorithm needs none of it
    from shoal.distributed.link import Link
    from shoal.normalize import Normalizer


def trained_params(optimizer: optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates, in a fixed order (the order of flat vectors)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def as_params(params: Iterable[torch.Tensor] | nn.Module) -> list[torch.Tensor]:
    """The trainable parameters given, as a list (a module stands for its parameters)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return [p for p in params if p.requires_grad]


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def set_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def flat_params(params: list[torch.Tensor]) -> torch.Tensor:
    return nn.utils.parameters_to_vector(params).detach()


def set_params(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    with torch.no_grad():
        nn.utils.vector_to_parameters(flat, params)


class Strategy:
    """One worker's view of the group it trains in."""

    rank: int = 0
    world_size: int = 1
    loss_decides = True  # a non-finite loss alone skips a step (see guards.gradients_ok)
    in_lockstep = False  # its workers meet in every update, so they must also stop together
    # Whether the workers' updates are averaged into one (sync, param-avg, a synchronous
    # server): together they are one learner, and a replay learner's batch is split among
    # them. Otherwise (a3c, an asynchronous server) each worker's update is applied on its
    # own, and each one learns from its own env steps with the whole batch.
    one_learner = True

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.comm_seconds = 0.0
        self.steps = 0  # optimizer steps taken (updates of the weights), of every optimizer
        self.nan_policy = "raise"
        self.nonfinite_skipped = 0  # steps not taken because loss or gradients were not finite
        self.param_names: dict[int, str] = {}
        self.optimizers: list[optim.Optimizer] = []  # the algorithm's, in its optimizers() order
        self.normalizer: Normalizer | None = None  # statistics to merge (None, or switched off: none)

    def watch(self, modules: dict[str, nn.Module], nan_policy: str) -> None:
        """Name the parameters (for a non-finite gradient's message) and set the NaN policy."""
        self.nan_policy = nan_policy
        self.param_names = {
            id(p): f"{m}.{name}" for m, module in modules.items() for name, p in module.named_parameters()
        }

    @property
    def is_chief(self) -> bool:
        """The worker that writes the run directory, logs and checkpoints."""
        return self.rank == 0

    def worker_seed(self, seed: int) -> int:
        """Each worker's envs and sampling get their own seed, derived from the run seed."""
        return seed + 1_000_003 * self.rank

    def start(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, optim.Optimizer],
        normalizer: Normalizer | None = None,
    ) -> None:
        """Called once before training (after a resume): make the workers' copies agree.

        ``optimizers`` in the algorithm's order: a worker and the server name an optimizer
        by its index in it. ``normalizer``: the statistics this strategy keeps merged.
        """
        self.optimizers = list(optimizers.values())
        self.normalizer = normalizer if normalizer is not None and normalizer.active else None

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What this worker's side of the cooperation needs to go on exactly after a resume:
        (arrays, JSON values), saved in checkpoints. Arrays under ``own/`` are this worker's
        alone (its error-feedback residuals); the rest is the same on every worker."""
        return {}, {}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, mine: bool = True) -> None:
        """Restore :meth:`state` (before :meth:`start`). ``mine``: saved by this worker; if not
        (it resumes from another's checkpoint), the ``own/`` arrays are not restored."""

    def merge_statistics(self, normalizer: Normalizer) -> None:
        """After an update: fold the statistics gathered since the last merge into those used.

        One learner merges its own; ``sync`` everyone's, every update. Strategies that merge
        elsewhere (with each average, with each push) override this to do nothing.
        """
        normalizer.merge(self._gather(normalizer.take_fresh()))

    def _gather(self, vector: np.ndarray) -> list[np.ndarray]:
        """Every worker's ``vector``, in rank order (a lone learner: its own)."""
        return [vector]

    def index(self, optimizer: optim.Optimizer) -> int:
        """Which of the algorithm's optimizers this is (one not given to ``start`` is added)."""
        for i, known in enumerate(self.optimizers):
            if known is optimizer:
                return i
        self.optimizers.append(optimizer)
        return len(self.optimizers) - 1

    def reduce_gradients(self, params: Iterable[torch.Tensor] | nn.Module, samples: int = 1) -> None:
        """Combine the gradients of ``params`` (from ``samples`` samples) with the group's, in place.

        ``params``: the parameters one optimizer is about to step (a module stands for its
        own). Call it between ``backward()`` and clipping, then :meth:`step` that optimizer.
        """

    def step(
        self,
        optimizer: optim.Optimizer,
        loss: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        """Apply the (reduced, clipped) gradients held in the parameters' ``.grad``, if finite.

        ``optimizer``: any of the algorithm's. ``loss`` and ``grad_norm`` (what
        ``clip_grad_norm`` returned) make the check cheap and its message precise. Non-finite:
        ``NonFiniteError`` (nan_policy raise) or :meth:`skip` (nan_policy skip). Subclasses
        change :meth:`apply` and :meth:`skip`.
        """
        ok = guards.gradients_ok(
            optimizer, loss, grad_norm, self.param_names, self.nan_policy, self.loss_decides
        )
        if ok:
            self.apply(optimizer)
        else:
            self.nonfinite_skipped += 1
            self.skip(optimizer)

    def apply(self, optimizer: optim.Optimizer) -> None:
        """The update itself, with gradients known to be finite."""
        optimizer.step()
        self.steps += 1

    def skip(self, optimizer: optim.Optimizer) -> None:
        """No update: the weights (and the optimizer's moments) stay as they were."""
        optimizer.zero_grad(set_to_none=True)

    def finish(self) -> None:
        """Training is over (called by every worker before the final checkpoint)."""

    def mean(self, value: float) -> float:
        """The group's mean of a per-worker number (for decisions all workers must share)."""
        return value

    def worker_sps(self, sps: float) -> list[float]:
        """Every worker's env steps/s, given this worker's (for the metrics)."""
        return [sps]

    def metrics(self) -> dict[str, float]:
        """Communication counters for the metrics rows (none for a learner that talks to no one)."""
        if not self.bytes_sent:
            return {}
        return {
            "bytes_sent": float(self.bytes_sent),
            "bytes_per_update": self.bytes_sent / max(1, self.steps),
            "comm_seconds": self.comm_seconds,
        }


class LocalStrategy(Strategy):
    """One process, one learner: every hook does the plain thing."""


class CollectiveStrategy(Strategy):
    """Workers in a torch.distributed group who all call the same collectives in step."""

    in_lockstep = True

    def __init__(self, rank: int, world_size: int, compress: str = "none", topk_ratio: float = 0.01) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.compress, self.topk_ratio = compress, topk_ratio
        # One compressor per vector summed (its error feedback is that vector's), made on first use.
        self.codecs: dict[Any, Compressor] = {}
        self.residuals: list[torch.Tensor] = []  # restored ones, for the codecs in the order made
        self.resumed = False  # from a checkpoint: the workers' copies need no broadcast

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super().state()
        for i, codec in enumerate(self.codecs.values()):  # made in the same order on every run
            if codec.residual is not None:
                arrays[f"own/residual/{i}"] = codec.residual.detach().cpu().numpy()
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, mine: bool = True) -> None:
        super().load_state(arrays, meta, mine=mine)
        count = len([k for k in arrays if k.startswith("own/residual/")]) if mine else 0
        self.residuals = [torch.from_numpy(arrays[f"own/residual/{i}"].copy()) for i in range(count)]
        self.resumed = True

    def start(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, optim.Optimizer],
        normalizer: Normalizer | None = None,
    ) -> None:
        import torch.distributed as dist

        super().start(modules, optimizers, normalizer)
        # Fresh: the same seed gave every worker the same weights; rank 0's make sure. Resumed:
        # each worker loaded its own state (param-avg copies differ between averages) or rank
        # 0's, so there is nothing to agree on, and a broadcast would undo the former.
        if not self.resumed:
            for module in modules.values():
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)
        if self.normalizer is not None:  # the statistics in use: rank 0's (a resume loaded them all)
            used = torch.from_numpy(self.normalizer.used_vector())
            dist.broadcast(used, src=0)
            self.normalizer.set_used(used.numpy())

    def _gather(self, vector: np.ndarray) -> list[np.ndarray]:
        """Every worker's ``vector`` (float64, never compressed), in rank order: each worker then
        merges them in the same order and ends with bitwise the same statistics."""
        import torch.distributed as dist

        if self.world_size == 1:
            return [vector]
        start = time.perf_counter()
        mine = torch.from_numpy(np.ascontiguousarray(vector, np.float64))
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        self.bytes_sent += mine.numel() * mine.element_size()
        self.comm_seconds += time.perf_counter() - start
        return [p.numpy() for p in parts]

    def _sum(self, vector: torch.Tensor, extra: float, key: Any = None) -> tuple[torch.Tensor, float]:
        """Sum over workers of ``vector`` (compressed on the wire) and of the scalar ``extra``.

        Uncompressed: one all-reduce with ``extra`` appended. Compressed: every worker's
        payload is all-gathered and summed in rank order, so all workers get the same result;
        ``key`` names the vector (whose residual the compressor keeps).
        """
        import torch.distributed as dist

        if self.world_size == 1:
            return vector, extra  # a group of one: nothing to exchange
        start = time.perf_counter()
        if self.compress == "none":
            buf = torch.cat([vector, torch.tensor([extra], dtype=vector.dtype, device=vector.device)])
            dist.all_reduce(buf)
            self.bytes_sent += buf.numel() * buf.element_size()
            total, extra_sum = buf[:-1], float(buf[-1])
        else:
            codec = self.codecs.get(key)
            if codec is None:
                codec = self.codecs[key] = Compressor(self.compress, vector.numel(), self.topk_ratio)
                if len(self.residuals) >= len(self.codecs):  # restored by a resume
                    codec.residual = self.residuals[len(self.codecs) - 1].to(vector.device)
            payload = codec.compress(vector)
            gathered = []
            for part in payload:
                parts = [torch.empty_like(part) for _ in range(self.world_size)]
                dist.all_gather(parts, part)
                gathered.append(parts)
            total = sum(codec.decompress(tuple(g[r] for g in gathered)) for r in range(self.world_size))
            count = torch.tensor([extra], dtype=torch.float64)
            dist.all_reduce(count)
            self.bytes_sent += codec.nbytes() + count.element_size()
            extra_sum = float(count)
        self.comm_seconds += time.perf_counter() - start
        return total, extra_sum

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def worker_sps(self, sps: float) -> list[float]:
        import torch.distributed as dist

        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([sps], dtype=torch.float64))
        return [float(t) for t in out]


class SyncStrategy(CollectiveStrategy):
    """Synchronous data parallelism (DD-PPO, sync SGD) over a torch.distributed process group.

    Every worker collects its own experience and computes gradients on it; one all-reduce of
    a single flattened buffer per optimizer step averages them, weighted by each worker's
    sample count, so the result is the gradient of the mean loss over everyone's samples.
    Every worker then applies the same update: weights never drift apart. Whether the step
    is taken at all is decided on the reduced gradients, the same on every worker. With
    several optimizers, every worker reduces and steps them in the same order.
    """

    loss_decides = False

    def reduce_gradients(self, params: Iterable[torch.Tensor] | nn.Module, samples: int = 1) -> None:
        params = as_params(params)
        if not params:
            raise ValueError("reduce_gradients was given no trainable parameters")
        key = (id(params[0]), len(params))  # the same list of parameters every time
        total, count = self._sum(flat_grad(params) * float(samples), float(samples), key)
        set_grad(params, total / count)  # sum of samples x gradient, over the sum of samples


class ParamAvgStrategy(CollectiveStrategy):
    """Model averaging: each worker steps its own copy; every ``sync_every`` optimizer steps
    all copies are replaced by their mean, theta = (1/N) sum_i theta_i.

    Every optimizer's parameters are averaged (one all-reduce each), and so are the weights
    no optimizer steps (target networks): a worker's target, copied or Polyak-averaged from
    its own online weights, would otherwise follow that worker's drifted copy, never the mean.
    ``sync_every`` counts step calls of any optimizer. Optimizer state stays per worker.
    Compressed, what is sent is each worker's change since the last average (the anchor),
    with error feedback; the mean is then anchor + mean of the changes, the same on every
    worker (target networks go uncompressed).
    """

    def __init__(
        self, rank: int, world_size: int, sync_every: int, compress: str = "none", topk_ratio: float = 0.01
    ) -> None:
        super().__init__(rank, world_size, compress, topk_ratio)
        self.sync_every = sync_every
        self.params: list[list[torch.Tensor]] = []  # per optimizer
        self.anchors: list[torch.Tensor] = []  # per optimizer: the last mean
        self.untrained: list[torch.Tensor] = []  # weights no optimizer steps (target networks)
        self.calls = 0  # step calls, taken or skipped: the averaging schedule all workers share
        self.restored_anchors: list[torch.Tensor] = []  # a resume's, for the optimizers in order

    def start(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, optim.Optimizer],
        normalizer: Normalizer | None = None,
    ) -> None:
        super().start(modules, optimizers, normalizer)
        trained = {id(p) for opt in optimizers.values() for p in trained_params(opt)}
        untrained = {id(p): p for m in modules.values() for p in m.parameters() if id(p) not in trained}
        self.untrained = [p for p in untrained.values() if p.is_floating_point()]

    def step(
        self,
        optimizer: optim.Optimizer,
        loss: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        self.index(optimizer)
        self._anchor()
        super().step(optimizer, loss, grad_norm)
        self.calls += 1
        if self.calls % self.sync_every == 0:
            self.average()

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super().state()
        if self.compress != "none":  # the last mean, the same on every worker
            arrays.update({f"anchor/{i}": a.detach().cpu().numpy() for i, a in enumerate(self.anchors)})
        return arrays, {**meta, "calls": self.calls}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, mine: bool = True) -> None:
        super().load_state(arrays, meta, mine=mine)
        self.calls = int(meta.get("calls", 0))
        count = len([k for k in arrays if k.startswith("anchor/")])
        self.restored_anchors = [torch.from_numpy(arrays[f"anchor/{i}"].copy()) for i in range(count)]

    def _anchor(self) -> None:
        """Anchor each optimizer's parameters when first seen: the last mean (fresh: they are
        equal everywhere, start() synced them; resumed: the checkpoint's anchors)."""
        for optimizer in self.optimizers[len(self.params) :]:
            self.params.append(trained_params(optimizer))
            i = len(self.anchors)
            restored = self.restored_anchors[i] if i < len(self.restored_anchors) else None
            self.anchors.append(flat_params(self.params[-1]).clone() if restored is None else restored)

    def merge_statistics(self, normalizer: Normalizer) -> None:
        """Merged with each average instead (see :meth:`average`)."""

    def average(self) -> None:
        if self.normalizer is not None:  # the workers' new statistics, merged as the weights meet
            self.normalizer.merge(self._gather(self.normalizer.take_fresh()))
        for i, (params, anchor) in enumerate(zip(self.params, self.anchors)):
            theta = flat_params(params)
            if self.compress == "none":
                total, _ = self._sum(theta, 0.0)
                mean = total / self.world_size
            else:
                delta, _ = self._sum(theta - anchor, 0.0, key=i)
                mean = anchor + delta / self.world_size
            set_params(params, mean)
            self.anchors[i] = mean.clone()
        if self.untrained and self.world_size > 1:  # uncompressed: no anchor, no error feedback
            import torch.distributed as dist

            start = time.perf_counter()
            total = flat_params(self.untrained).clone()
            dist.all_reduce(total)
            set_params(self.untrained, total / self.world_size)
            self.bytes_sent += total.numel() * total.element_size()
            self.comm_seconds += time.perf_counter() - start

    def finish(self) -> None:
        if self.params and self.calls % self.sync_every:
            self.average()  # the final model is the mean, whatever K


class ServerStrategy(Strategy):
    """A worker of ``a3c`` or ``param-server``: push gradients to the global model, pull weights.

    The parameter server (over this worker's link) applies each pushed gradient with the
    global copy of the optimizer it is for, and answers with the change of that optimizer's
    global weights since this worker last pulled, so the worker continues from fresh
    weights. In ``async`` mode the server does not wait for the others; in ``sync`` mode it
    waits for a push for that optimizer from every worker and applies their sample-weighted
    mean once. Messages are those of ``shoal.distributed.wire``.

    ``pipelined`` (A3C): the worker does not wait for the answer either. It posts the push
    and goes on collecting experience; the answer, which arrives meanwhile, is applied just
    before its next push. The server's latency then hides behind env steps, at the price
    of acting and computing each gradient one global update later (a policy lag >= 1,
    measured and bounded like any other).

    ``peer_timeout`` (seconds, None: unbounded): how long to wait for an answer the server
    owes before raising ``PeerTimeout`` (a server that cannot answer yet says so meanwhile).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        compress: str = "none",
        topk_ratio: float = 0.01,
        pipelined: bool = False,
        link: Link | None = None,
        peer_timeout: float | None = wire.PEER_TIMEOUT_S,
        averaged: bool = False,
    ) -> None:
        super().__init__()
        self.one_learner = averaged  # the server applies the workers' mean once (ps-mode sync)
        self.rank, self.world_size = rank, world_size
        self.link: Link = link  # type: ignore[assignment]  # set before start() (see shoal.distributed.link)
        self.compress, self.topk_ratio, self.pipelined = compress, topk_ratio, pipelined
        self.peer_timeout = peer_timeout
        self.in_flight: tuple | None = None  # pipelined: (send work, recv work, message, buffer)
        self.params: list[list[torch.Tensor]] = []  # per optimizer
        self.push_codecs: list[Compressor] = []
        self.pull_codecs: list[Compressor] = []
        self.versions: list[int] = []  # per optimizer: the global update our weights come from
        self.samples = 1
        self.sps = 0.0
        self.all_sps = [0.0] * world_size
        self.lags: list[float] = []
        self.lag_max = 0.0
        self.dropped = 0  # this worker's gradients the server refused as too stale
        self.dropped_all = 0.0  # everyone's, as the server last told us
        self.stats_size = 0  # float64 values of the normalisation statistics on the wire

    @property
    def version(self) -> int:
        """Global updates our weights come from, over every optimizer."""
        return sum(self.versions)

    def start(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, optim.Optimizer],
        normalizer: Normalizer | None = None,
    ) -> None:
        # The server greets every worker that opens its link with the global weights (and
        # statistics): the same as ours at the start of a run, the current ones for a worker
        # that replaces a lost one. Sizes are fixed here too, so even a worker that never
        # steps can say Done.
        super().start(modules, optimizers, normalizer)
        self.stats_size = self.normalizer.size if self.normalizer is not None else 0
        self.params = [trained_params(o) for o in self.optimizers]
        self.sizes = sizes = [sum(p.numel() for p in params) for params in self.params]
        self.push_codecs = [Compressor(self.compress, n, self.topk_ratio) for n in sizes]
        self.pull_codecs = [
            Compressor(self.compress, n, self.topk_ratio, error_feedback=False) for n in sizes
        ]
        self.pull_layouts = [c.empty() for c in self.pull_codecs]
        self.versions = [0] * len(sizes)
        buffer = torch.empty(wire.weights_size(sum(sizes), self.stats_size), dtype=torch.uint8)
        self._set_weights(self._receive(buffer, wire.Weights))
        self.bytes_sent += buffer.numel()

    def merge_statistics(self, normalizer: Normalizer) -> None:
        """Merged by the server: new statistics go with each push, merged ones come back."""

    def _set_weights(self, message: wire.Weights) -> None:
        for params, part in zip(self.params, message.weights.split(self.sizes)):
            set_params(params, part.to(params[0].device))
        self._set_statistics(message.stats)

    def _set_statistics(self, stats: torch.Tensor) -> None:
        if self.normalizer is not None and stats.numel() == self.stats_size:
            self.normalizer.set_used(stats.numpy().copy())

    def _new_statistics(self) -> torch.Tensor:
        """What this worker gathered since its last push (sent with the next one)."""
        if self.normalizer is None:
            return wire.NO_STATS
        return torch.from_numpy(self.normalizer.take_fresh())

    def _receive(self, buffer: torch.Tensor, expected: type) -> Any:
        """The server's next message of type ``expected``, skipping its Waiting signs of life."""
        while True:
            self.link.recv(buffer, self.peer_timeout)
            message = wire.decode(buffer, self.pull_layouts)
            if not isinstance(message, wire.Waiting):
                break
        if not isinstance(message, expected):
            got, wanted = type(message).__name__, expected.__name__
            raise RuntimeError(f"the parameter server sent a {got}, not a {wanted}")
        return message

    def reduce_gradients(self, params: Iterable[torch.Tensor] | nn.Module, samples: int = 1) -> None:
        self.samples = samples  # the server weights gradients by it in sync mode

    def apply(self, optimizer: optim.Optimizer) -> None:
        i = self._known(optimizer)
        grad = flat_grad(self.params[i]).cpu()  # the server's group is gloo
        self.steps += 1
        self._push(i, optimizer, lambda: self.push_codecs[i].compress(grad), self.samples)

    def skip(self, optimizer: optim.Optimizer) -> None:
        # Still push (a sync server waits for everyone), but nothing: zeros from 0 samples,
        # which the server does not apply; the compressor's error feedback is left untouched.
        super().skip(optimizer)
        i = self._known(optimizer)
        self._push(i, optimizer, lambda: self.push_codecs[i].empty(), 0)

    def _known(self, optimizer: optim.Optimizer) -> int:
        if not self.push_codecs:
            raise RuntimeError("ServerStrategy.step before start: the server has not greeted this worker")
        i = self.index(optimizer)
        if i >= len(self.push_codecs):
            raise ValueError("an optimizer not given to start(): the server holds only those")
        return i

    def _push(self, i: int, optimizer: optim.Optimizer, payload: Any, samples: float) -> None:
        """Send ``payload()`` (computed after the previous answer landed) and take the answer."""
        lr = float(optimizer.param_groups[0]["lr"])
        start = time.perf_counter()
        computed_at = self.versions[i]  # the version of the weights this gradient was computed on
        self._land()  # pipelined: the answer to our previous push arrives only now
        push = wire.Push(i, computed_at, float(samples), lr, self.sps, payload(), self._new_statistics())
        message = wire.encode(push)
        size = wire.reply_size(self.pull_layouts[i], self.world_size, self.stats_size)
        buffer = torch.empty(size, dtype=torch.uint8)
        if self.pipelined:
            sent = self.link.isend(message)
            self.in_flight = (sent, self.link.irecv(buffer), message, buffer)
        else:
            self.link.send(message, self.peer_timeout)
            self._apply(self._receive(buffer, wire.Reply))
        self.comm_seconds += time.perf_counter() - start
        self.bytes_sent += message.numel() + buffer.numel()  # both ways

    def _land(self) -> None:
        """Wait for the answer to a pipelined push, if one is in flight, and apply it."""
        if self.in_flight is not None:
            sent, received, _, buffer = self.in_flight
            self.in_flight = None
            self.link.wait(sent, self.peer_timeout)
            self.link.wait(received, self.peer_timeout)
            message = wire.decode(buffer, self.pull_layouts)
            if isinstance(message, wire.Waiting):  # (a sync server still completing the round)
                message = self._receive(buffer, wire.Reply)
            self._apply(message)

    def _apply(self, reply: wire.Reply) -> None:
        """Take the server's answer: the weight change, the new version and the counters."""
        i = reply.optimizer
        params = self.params[i]
        delta = self.pull_codecs[i].decompress(reply.payload).to(params[0].device)
        set_params(params, flat_params(params) + delta)
        self.versions[i] = reply.version
        self._set_statistics(reply.stats)
        self.dropped_all = float(reply.dropped)
        self.all_sps = reply.worker_sps
        self.lags.append(float(reply.lag))
        self.lag_max = max(self.lag_max, float(reply.lag))
        self.dropped += not reply.accepted

    def finish(self) -> None:
        if not self.push_codecs:
            raise RuntimeError("ServerStrategy.finish before start: the server would wait for us forever")
        self._land()
        self.link.send(wire.encode(wire.Done()), self.peer_timeout)
        if self.is_chief:  # the chief saves and evaluates the global model, as it is at the very end
            buffer = torch.empty(wire.weights_size(sum(self.sizes), self.stats_size), dtype=torch.uint8)
            self._set_weights(self._receive(buffer, wire.Weights))

    def worker_sps(self, sps: float) -> list[float]:
        self.sps = sps  # travels to the server with the next push
        return [sps if r == self.rank else s for r, s in enumerate(self.all_sps)]

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if self.lags:
            out["policy_lag"] = sum(self.lags) / len(self.lags)
            out["policy_lag_max"] = self.lag_max
            self.lags.clear()
            self.lag_max = 0.0
        out["dropped_gradients"] = float(self.dropped)
        out["dropped_gradients_all"] = self.dropped_all
        out["global_version"] = float(self.version)
        return out
