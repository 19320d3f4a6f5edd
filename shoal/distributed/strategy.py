"""How training workers cooperate. An algorithm is handed one strategy and never asks more.

The algorithm calls ``reduce_gradients`` between ``backward()`` and gradient clipping, and
``step(optimizer)`` where a lone learner would call ``optimizer.step()``. Each strategy is
an implementation of these two hooks:

- ``LocalStrategy``: one learner; ``step`` is ``optimizer.step()``.
- ``SyncStrategy`` (``sync``): gradients all-reduced (DD-PPO, sync SGD); weights never drift.
- ``ParamAvgStrategy`` (``param-avg``): local steps, parameters averaged every K steps.
- ``ServerStrategy`` (``a3c``, ``param-server``): gradients pushed to the global model held
  by a parameter server (``shoal.distributed.server``), fresh weights pulled back.

Workers ``0 .. world_size - 1`` form a torch.distributed group (gloo on CPU); with a
parameter server each worker talks to it over a link of its own (``shoal.distributed.link``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn, optim

from shoal import guards
from shoal.distributed.compress import Compressor, nbytes, pack, unpack
from shoal.distributed.link import Link

# A message between a worker and the parameter server is ONE byte buffer: a float64 header
# and the (compressed) payload. Pushes: kind, version the gradient was computed at, samples,
# learning rate, worker sps. Replies: version, accepted, lag, dropped, every worker's sps.
PUSH, DONE = 1.0, 2.0


def push_message(codec: Compressor) -> tuple[torch.Tensor, ...]:
    """The shape of a push (a DONE has the same size, so the server can receive either)."""
    return (torch.zeros(5, dtype=torch.float64), *codec.empty())


def reply_message(codec: Compressor, num_workers: int) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(4 + num_workers, dtype=torch.float64), *codec.empty())


def trained_params(optimizer: optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates, in a fixed order (the order of flat vectors)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


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

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.comm_seconds = 0.0
        self.steps = 0  # optimizer steps taken (updates of the weights)
        self.nan_policy = "raise"
        self.nonfinite_skipped = 0  # steps not taken because loss or gradients were not finite
        self.param_names: dict[int, str] = {}

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

    def start(self, modules: dict[str, nn.Module], optimizers: dict[str, optim.Optimizer]) -> None:
        """Called once before training (after a resume): make the workers' copies agree."""

    def reduce_gradients(self, params: list[torch.Tensor], samples: int = 1) -> None:
        """Combine this worker's gradients of ``params`` (from ``samples`` samples) with the group's."""

    def step(
        self,
        optimizer: optim.Optimizer,
        loss: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        """Apply the (reduced, clipped) gradients held in the parameters' ``.grad``, if finite.

        ``loss`` and ``grad_norm`` (what ``clip_grad_norm`` returned) make the check cheap
        and its message precise. Non-finite: ``NonFiniteError`` (nan_policy raise) or
        :meth:`skip` (nan_policy skip). Subclasses change :meth:`apply` and :meth:`skip`.
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
        self.codec: Compressor | None = None  # made on first use, when the size is known

    def start(self, modules: dict[str, nn.Module], optimizers: dict[str, optim.Optimizer]) -> None:
        import torch.distributed as dist

        for module in modules.values():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _sum(self, vector: torch.Tensor, extra: float) -> tuple[torch.Tensor, float]:
        """Sum over workers of ``vector`` (compressed on the wire) and of the scalar ``extra``.

        Uncompressed: one all-reduce with ``extra`` appended. Compressed: every worker's
        payload is all-gathered and summed in rank order, so all workers get the same result.
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
            if self.codec is None:
                self.codec = Compressor(self.compress, vector.numel(), self.topk_ratio)
            payload = self.codec.compress(vector)
            gathered = []
            for part in payload:
                parts = [torch.empty_like(part) for _ in range(self.world_size)]
                dist.all_gather(parts, part)
                gathered.append(parts)
            total = sum(self.codec.decompress(tuple(g[r] for g in gathered)) for r in range(self.world_size))
            count = torch.tensor([extra], dtype=torch.float64)
            dist.all_reduce(count)
            self.bytes_sent += self.codec.nbytes() + count.element_size()
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
    is taken at all is decided on the reduced gradients, the same on every worker.
    """

    loss_decides = False

    def reduce_gradients(self, params: list[torch.Tensor], samples: int = 1) -> None:
        params = [
            p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad
        ]
        total, count = self._sum(flat_grad(params) * float(samples), float(samples))
        set_grad(params, total / count)  # sum of samples x gradient, over the sum of samples


class ParamAvgStrategy(CollectiveStrategy):
    """Model averaging: each worker steps its own copy; every ``sync_every`` optimizer steps
    all copies are replaced by their mean, theta = (1/N) sum_i theta_i.

    Optimizer state stays per worker. Compressed, what is sent is each worker's change
    since the last average (the anchor), with error feedback; the mean is then
    anchor + mean of the changes, the same on every worker.
    """

    def __init__(
        self, rank: int, world_size: int, sync_every: int, compress: str = "none", topk_ratio: float = 0.01
    ) -> None:
        super().__init__(rank, world_size, compress, topk_ratio)
        self.sync_every = sync_every
        self.params: list[torch.Tensor] = []
        self.anchor: torch.Tensor | None = None
        self.calls = 0  # step calls, taken or skipped: the averaging schedule all workers share

    def step(
        self,
        optimizer: optim.Optimizer,
        loss: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        if not self.params:
            self.params = trained_params(optimizer)
            self.anchor = flat_params(self.params).clone()  # equal everywhere: start() synced it
        super().step(optimizer, loss, grad_norm)
        self.calls += 1
        if self.calls % self.sync_every == 0:
            self.average()

    def average(self) -> None:
        theta = flat_params(self.params)
        if self.compress == "none":
            total, _ = self._sum(theta, 0.0)
            mean = total / self.world_size
        else:
            delta, _ = self._sum(theta - self.anchor, 0.0)
            mean = self.anchor + delta / self.world_size
        set_params(self.params, mean)
        self.anchor = mean.clone()

    def finish(self) -> None:
        if self.params and self.calls % self.sync_every:
            self.average()  # the final model is the mean, whatever K


class ServerStrategy(Strategy):
    """A worker of ``a3c`` or ``param-server``: push gradients to the global model, pull weights.

    The parameter server (over this worker's link) applies each pushed gradient
    with the global optimizer and answers with the change of the global weights since this
    worker last pulled, so the worker continues from fresh weights. In ``async`` mode the
    server does not wait for the others; in ``sync`` mode it waits for all workers and
    applies their sample-weighted mean gradient once.

    ``pipelined`` (A3C): the worker does not wait for the answer either. It posts the push
    and goes on collecting experience; the answer, which arrives meanwhile, is applied just
    before its next push. The server's latency then hides behind env steps, at the price
    of acting and computing each gradient one global update later (a policy lag >= 1,
    measured and bounded like any other).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        compress: str = "none",
        topk_ratio: float = 0.01,
        pipelined: bool = False,
        link: Link | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size, self.server = rank, world_size, world_size
        self.link: Link = link  # type: ignore[assignment]  # set before start() (see shoal.distributed.link)
        self.compress, self.topk_ratio, self.pipelined = compress, topk_ratio, pipelined
        self.in_flight: tuple | None = None  # pipelined: (send work, recv work, buffers) of the last push
        self.push_codec: Compressor | None = None
        self.pull_codec: Compressor | None = None
        self.params: list[torch.Tensor] = []
        self.version = 0  # the global update our weights come from
        self.samples = 1
        self.sps = 0.0
        self.all_sps = [0.0] * world_size
        self.lags: list[float] = []
        self.lag_max = 0.0
        self.dropped = 0  # this worker's gradients the server refused as too stale
        self.dropped_all = 0.0  # everyone's, as the server last told us

    def start(self, modules: dict[str, nn.Module], optimizers: dict[str, optim.Optimizer]) -> None:
        # The server greets every worker that opens its link with the global weights: the
        # same as ours at the start of a run, the current ones for a worker that replaces a
        # lost one. Sizes are fixed here too, so even a worker that never steps can say DONE.
        (optimizer,) = optimizers.values()
        self._prepare(trained_params(optimizer))
        weights = torch.empty(self.push_codec.numel)
        self.link.recv(weights)
        set_params(self.params, weights.to(self.params[0].device))
        self.bytes_sent += weights.numel() * weights.element_size()

    def _prepare(self, params: list[torch.Tensor]) -> None:
        self.params = params
        n = sum(p.numel() for p in params)
        self.push_codec = Compressor(self.compress, n, self.topk_ratio)
        self.pull_codec = Compressor(self.compress, n, self.topk_ratio, error_feedback=False)
        self.reply_like = reply_message(self.pull_codec, self.world_size)  # layout of every answer

    def reduce_gradients(self, params: list[torch.Tensor], samples: int = 1) -> None:
        self.samples = samples  # the server weights gradients by it in sync mode

    def apply(self, optimizer: optim.Optimizer) -> None:
        params = trained_params(optimizer)
        if self.push_codec is None:
            self._prepare(params)
        grad = flat_grad(params).cpu()  # the server's group is gloo
        self.steps += 1
        self._push(optimizer, lambda: self.push_codec.compress(grad), self.samples)

    def skip(self, optimizer: optim.Optimizer) -> None:
        # Still push (a sync server waits for everyone), but nothing: zeros from 0 samples,
        # which the server does not apply; the compressor's error feedback is left untouched.
        super().skip(optimizer)
        if self.push_codec is None:
            self._prepare(trained_params(optimizer))
        self._push(optimizer, lambda: push_message(self.push_codec)[1:], 0)

    def _push(self, optimizer: optim.Optimizer, payload: Any, samples: float) -> None:
        """Send ``payload()`` (computed after the previous answer landed) and take the answer."""
        lr = float(optimizer.param_groups[0]["lr"])
        start = time.perf_counter()
        computed_at = self.version  # the version of the weights this gradient was computed on
        self._land()  # pipelined: the answer to our previous push arrives only now
        header = torch.tensor([PUSH, computed_at, samples, lr, self.sps], dtype=torch.float64)
        message = pack((header, *payload()))
        buffer = torch.empty(nbytes(self.reply_like), dtype=torch.uint8)
        if self.pipelined:
            sent = self.link.isend(message)
            self.in_flight = (sent, self.link.irecv(buffer), message, buffer)
        else:
            self.link.send(message)
            self.link.recv(buffer)
            self._apply(buffer)
        self.comm_seconds += time.perf_counter() - start
        self.bytes_sent += message.numel() + buffer.numel()  # both ways

    def _land(self) -> None:
        """Wait for the answer to a pipelined push, if one is in flight, and apply it."""
        if self.in_flight is not None:
            sent, received, _, buffer = self.in_flight
            self.link.wait(sent)
            self.link.wait(received)
            self.in_flight = None
            self._apply(buffer)

    def _apply(self, buffer: torch.Tensor) -> None:
        """Take the server's answer: the weight change, the new version and the counters."""
        reply, *pulled = unpack(buffer, self.reply_like)
        delta = self.pull_codec.decompress(tuple(pulled)).to(self.params[0].device)
        set_params(self.params, flat_params(self.params) + delta)
        version, accepted, lag, self.dropped_all = reply[:4].tolist()
        self.all_sps = reply[4:].tolist()
        self.version = int(version)
        self.lags.append(lag)
        self.lag_max = max(self.lag_max, lag)
        self.dropped += not accepted

    def finish(self) -> None:
        if self.push_codec is None:
            raise RuntimeError("ServerStrategy.finish before start: the server would wait for us forever")
        self._land()
        done = push_message(self.push_codec)
        done[0][0] = DONE
        self.link.send(pack(done))
        if self.is_chief:  # the chief saves and evaluates the global model, as it is at the very end
            final = torch.empty(self.push_codec.numel)
            self.link.recv(final)
            set_params(self.params, final.to(self.params[0].device))

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
