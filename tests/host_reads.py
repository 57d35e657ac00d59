"""A host-read sentinel: what in a training step would make the host wait for a GPU, found on CPU.

On a GPU the host queues work and runs ahead of it. It waits where it reads a value the device
computed: ``.item()``, ``.tolist()``, ``bool()``/``int()``/``float()`` of a tensor, ``.numpy()``,
``.cpu()``, and ops whose output size depends on values (boolean indexing, ``nonzero``,
``unique``, ``repeat_interleave`` by a tensor, ``masked_select``); and where it copies host memory
to the device without ``non_blocking=True`` or from pageable (not pinned) memory, or builds a
device tensor from Python data (``torch.tensor(..., device=...)``). On CPU none of that waits, so
the sentinel keeps track of which tensors would live on the device (the watched modules'
parameters and buffers, everything computed from them, and whatever is copied or created on the
step's device ``DEVICE``) and records each such read or copy with the line of ours that made it.

A step runs on ``DEVICE`` (cpu:0). Tensors made with a device named (``device=...``, a copy
``.to(...)``) are device tensors, and a host tensor's ``.to(<a CPU device>)`` is a copy to the
device: in a step that is ``.to(x.device)`` for some device tensor x; host code names no device. Pinning is simulated while the sentinel runs (``pin_memory`` on a CPU-only build
raises): ``pin_memory`` returns a copy marked pinned, ``is_pinned`` reads the mark, and
``data.batch.pins`` answers for CPU devices as for CUDA.
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

DEVICE = torch.device("cpu", 0)
aten = torch.ops.aten
T = torch.Tensor
READS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.numpy, T.cpu, T.__array__}
SIZE_FROM_VALUES = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten._unique.default,
                    aten.unique_dim.default, aten.unique_consecutive.default, aten._local_scalar_dense.default,
                    aten.equal.default, aten.is_nonzero.default, aten.repeat_interleave.Tensor,
                    aten.repeat_interleave.self_Tensor, aten.nonzero_numpy.default}
FROM_PYTHON_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _where() -> str:
    """The innermost frame of ours (dist_embed, transformers, tests) that led here."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if "/torch/" not in name and not name.endswith("host_reads.py"):
            return f"{name.split('site-packages/')[-1]}:{frame.lineno} {frame.line}"
    return "?"


def _target_device(args, kwargs):
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (torch.device, str)):
            try:
                return torch.device(a)
            except RuntimeError:
                continue
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: reads.watch(model); ...`` then ``reads.events`` lists what
    would wait for the device (``reads.paused()`` leaves out a stretch, e.g. a log step)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.device = WeakIdKeyDictionary()
        self.pinned = WeakIdKeyDictionary()
        self.off = 0
        self.square_at: int | None = None  # if set: record tensors made with two dims of at least this
        self.squares: list[tuple] = []

    # -- what lives on the device ------------------------------------------------------------------

    def watch(self, *objects) -> None:
        """Modules (their parameters and buffers), optimizers (their state), fp16 loss scalers or
        tensors on the device."""
        for obj in objects:
            if isinstance(obj, torch.amp.GradScaler):
                tensors = [t for t in (obj._scale, obj._growth_tracker) if t is not None]
            elif isinstance(obj, torch.nn.Module):
                tensors = list(obj.parameters()) + list(obj.buffers())
            elif isinstance(obj, torch.optim.Optimizer):
                tensors = [t for st in obj.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
            else:
                tensors = [obj] if isinstance(obj, torch.Tensor) else []
            for t in tensors:
                self.device[t] = True

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.device

    def record(self, kind: str, what: str) -> None:
        if not self.off:
            self.events.append(f"{kind} {what} at {_where()}")

    @contextlib.contextmanager
    def paused(self):
        self.off += 1
        try:
            yield
        finally:
            self.off -= 1

    # -- the modes -----------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS and args and self.on_device(args[0]):
            self.record("read", getattr(func, "__name__", str(func)))
            with self.paused():  # one event per read (the op beneath it would count it again)
                return func(*args, **kwargs)
        if func in (T.to, T.cuda) and args:
            self._check_move(args[0], _target_device(args[1:], kwargs), kwargs.get("non_blocking", False)
                             or any(a is True for a in args[1:]))
        elif func is T.copy_ and len(args) > 1:
            dst, src = args[0], args[1]
            if self.on_device(dst) and not self.on_device(src):
                self._check_move(src, DEVICE, kwargs.get("non_blocking", len(args) > 2 and args[2]))
            elif self.on_device(src) and not self.on_device(dst):
                self.record("read", "copy_ to the host")
        elif func in FROM_PYTHON_DATA and _target_device((), kwargs) is not None and not (
                args and self.on_device(args[0])):
            self.record("blocking copy", f"{func.__name__}(..., device=...) from host data")
        out = func(*args, **kwargs)
        named = kwargs.get("device") is not None or (func in (T.to, T.cuda) and _target_device(args[1:], {}))
        if named and isinstance(out, torch.Tensor) and not (args and out is args[0]):
            # made with a device named (``torch.full(..., device=x.device)``): in a step that is the
            # GPU; host code names none
            self.device[out] = True
        return out

    def _check_move(self, src, target, non_blocking) -> None:
        if target is None or not isinstance(src, torch.Tensor):
            return
        # every tensor being on the CPU here, a host tensor's ``.to(cpu)`` is ``.to(x.device)`` of some
        # device tensor x: a copy to the device. (A device tensor's ``.to(cpu)`` looks the same: copies
        # to the host are caught where the host reads them, and as ``.cpu()``.)
        if target.type == "cpu" and not self.on_device(src):
            if not non_blocking:
                self.record("blocking copy", "to the device without non_blocking=True")
            elif src not in self.pinned:
                self.record("blocking copy", "to the device from pageable (unpinned) memory")

    def __enter__(self):
        self._dispatch = _Propagate(self)
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(_simulated_pinning(self))
        super().__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        super().__exit__(*exc)
        self._patches.close()
        return False


class _Propagate(TorchDispatchMode):
    """Marks every op's outputs as device tensors when an input is one (or it was made on DEVICE),
    and records the ops whose output size needs the values."""

    def __init__(self, owner: HostReads):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owner = self.owner
        flat, _ = tree_flatten((args, kwargs))
        target = kwargs.get("device")
        on_device = target is not None and torch.device(target) == DEVICE or any(owner.on_device(t) for t in flat)
        if on_device:
            if func in SIZE_FROM_VALUES and not (func in (aten.repeat_interleave.Tensor,
                                                          aten.repeat_interleave.self_Tensor)
                                                 and kwargs.get("output_size") is not None):
                owner.record("read", f"{func} (its output size depends on values)")
            elif func in INDEXING and any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                                          for t in (args[1] if len(args) > 1 else ())):
                owner.record("read", f"{func} with a boolean mask (its output size depends on values)")
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    owner.device[t] = True
        if owner.square_at:  # any tensor made, on the device or not (a mask starts from an arange)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and sum(d >= owner.square_at for d in t.shape) >= 2:
                    owner.squares.append((str(func), tuple(t.shape)))
        return out


@contextlib.contextmanager
def _simulated_pinning(owner: HostReads):
    import dist_embed.data.batch as batch_module

    real_pin, real_is_pinned, real_pins = T.pin_memory, T.is_pinned, batch_module.pins

    def pin_memory(self, *args, **kwargs):
        with owner.paused():
            copy = self.clone()
        owner.pinned[copy] = True
        return copy

    def is_pinned(self, *args, **kwargs):
        return self in owner.pinned

    T.pin_memory, T.is_pinned = pin_memory, is_pinned
    batch_module.pins = lambda device: device.type == "cpu" or real_pins(device)  # every CPU device: "the GPU"
    try:
        yield
    finally:
        T.pin_memory, T.is_pinned, batch_module.pins = real_pin, real_is_pinned, real_pins
