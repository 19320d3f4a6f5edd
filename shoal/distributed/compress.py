"""Communication reduction: what a worker sends instead of a full float32 vector.

``none`` sends the vector as is, ``fp16`` in half precision, ``topk`` only the largest
``ratio`` of its entries (by magnitude) as int32 indices plus float32 values. Lossy modes
keep error feedback: whatever was not sent is added to the next vector before it is
compressed, so nothing is lost, only delayed (Seide et al., 2014; Lin et al., 2018).

A payload is a tuple of tensors of fixed shapes, so it can go through torch.distributed's
collectives and point-to-point calls with buffers allocated once.
"""

from __future__ import annotations

import torch

MODES = ("none", "fp16", "topk")


class Compressor:
    """Compresses vectors of ``numel`` float32 entries; one per sender, it holds the residual."""

    def __init__(self, mode: str, numel: int, ratio: float = 0.01, error_feedback: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"compress must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.numel = mode, numel
        self.k = max(1, min(numel, round(numel * ratio)))
        # Without error feedback the caller tracks what the receiver has (the server's mirrors).
        self.error_feedback = error_feedback and mode != "none"
        self.residual: torch.Tensor | None = None  # what was left out, on the vectors' device

    def empty(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Buffers shaped like one payload (to receive into)."""
        if self.mode == "none":
            return (torch.zeros(self.numel, device=device),)
        if self.mode == "fp16":
            return (torch.zeros(self.numel, dtype=torch.float16, device=device),)
        return torch.zeros(self.k, dtype=torch.int32, device=device), torch.zeros(self.k, device=device)

    def nbytes(self) -> int:
        """Bytes of one payload on the wire."""
        return nbytes(self.empty())

    def compress(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The payload for ``vector``; what it leaves out is carried to the next call."""
        if self.mode == "none":
            return (vector,)
        if self.error_feedback and self.residual is not None:
            vector = vector + self.residual
        if self.mode == "fp16":
            sent = vector.half()
            if self.error_feedback:
                self.residual = vector - sent.float()
            return (sent,)
        idx = vector.abs().topk(self.k, sorted=False).indices
        if self.error_feedback:
            self.residual = vector.index_fill(0, idx, 0.0)
        return idx.int(), vector[idx]

    def decompress(self, payload: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The dense float32 vector a payload stands for."""
        if self.mode == "none":
            return payload[0]
        if self.mode == "fp16":
            return payload[0].float()
        out = torch.zeros(self.numel, device=payload[1].device)
        out.index_add_(0, payload[0].long(), payload[1])
        return out


def pack(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Tensors of any dtypes as one byte buffer: one message instead of several."""
    return torch.cat([p.detach().contiguous().reshape(-1).view(torch.uint8) for p in parts])


def unpack(buffer: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors ``pack`` put in ``buffer``, shaped and typed like ``like``."""
    out, offset = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        out.append(buffer[offset : offset + n].view(t.dtype).view(t.shape))
        offset += n
    return tuple(out)


def nbytes(parts: tuple[torch.Tensor, ...]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)
