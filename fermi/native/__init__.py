"""Fermi's own CPU kernels (``kernels.c``), compiled on this machine at first use.

The source ships with the package; the first process that needs it compiles it with the C
compiler (``$CC``, else ``cc``) for this CPU (``-O3 -march=native -fopenmp``), about half
a second, into ``FERMI_NATIVE_CACHE`` (default ``~/.cache/fermi/native``), named by a hash
of the source, the flags and the CPU's feature flags; later processes load that file. The
library is called through ``ctypes``: each call passes tensor addresses, so callers keep
the tensors alive and contiguous for the call.

It needs x86 with AVX2, F16C and FMA (or AVX-512). Without them, without a compiler, or
with ``FERMI_NATIVE=0``, :func:`library` returns None and the CPU runner keeps torch's
kernels (FBGEMM's fp16 products on x86). The OpenMP library the kernels link is the one
torch loaded (same ``libgomp.so.1``), so they share torch's threads and wait policy.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from fermi.cache_dirs import user_cache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
# The weight layout kernels.c reads: panels of PANEL output rows, [ceil(n / PANEL)][k][PANEL].
PANEL = 16

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


# fermi_weight's formats (kernels.c): how a weight's panels hold it.
FORMATS = {"fp16": 0, "int8": 1, "int4": 2}


class Weight(ctypes.Structure):
    """``fermi_weight`` of kernels.c: a weight's panels, scales and minimums."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("mins", ctypes.c_void_p),
        ("group", ctypes.c_long),
        ("format", ctypes.c_long),
    ]


class Layer(ctypes.Structure):
    """``fermi_layer`` of kernels.c: one decoder layer's weights, norms and cache."""

    _fields_ = [
        ("w", Weight * 4),
        ("bias", ctypes.c_void_p * 4),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("window", ctypes.c_long),
        ("rope", ctypes.c_long),
    ]


class Stack(ctypes.Structure):
    """``fermi_stack`` of kernels.c: a decoder's shape and its layers."""

    _fields_ = [
        ("layers", ctypes.c_long),
        ("hidden", ctypes.c_long),
        ("heads", ctypes.c_long),
        ("kv_heads", ctypes.c_long),
        ("head_dim", ctypes.c_long),
        ("inter", ctypes.c_long),
        ("rot", ctypes.c_long),
        ("max_seq", ctypes.c_long),
        ("kv_half", ctypes.c_long),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("layer", ctypes.POINTER(Layer)),
    ]


# Each function's arguments, one letter each: p pointer, l long, i int, f float; then its
# result ("" for none).
_TYPES = {"p": ctypes.c_void_p, "l": ctypes.c_long, "i": ctypes.c_int, "f": ctypes.c_float}
_SIGNATURES = {
    "fermi_simd": ("", "i"),
    "fermi_layout": ("", "i"),
    # weight, bias, n, k, x, ldx, m, norm_w, eps, act, residual, ldr, y, ldy, threads
    "fermi_linear": ("ppllpllpfiplpli", "i"),
    # qkv, h, kv, d, q_norm, k_norm, eps, rot, cos, sin, k_cache, v_cache, max_seq, pos,
    # first, scale, out, threads, half (the caches hold fp16, else float32)
    "fermi_attend_row": ("piiippfipppplllfpii", "i"),
    "fermi_stack_size": ("", "i"),
    # stack, x, rows, slots, positions, cos1, sin1, cos2, sin2, threads
    "fermi_decode_rows": ("pplppppppi", "i"),
}


def cache_root() -> Path:
    return user_cache("FERMI_NATIVE_CACHE", "native")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``kernels.c`` with ``flags`` (once per machine: later calls find the file,
    even without a compiler) and return the library's path. Raises ``RuntimeError`` with
    the compiler's message."""
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_flags().encode()])
    ).hexdigest()[:20]
    root = cache_root()
    target = root / f"kernels-{key}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} is not on PATH)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=root)
    except OSError as e:  # (a service account's HOME, a read-only home in a container)
        raise RuntimeError(
            f"cannot write their cache {root} ({e.strerror or e}); "
            "set FERMI_NATIVE_CACHE to a writable folder"
        ) from e
    with scratch as tmp:
        out = Path(tmp) / target.name
        try:
            done = subprocess.run(
                [cc, *flags, str(SOURCE), "-o", str(out), "-lm"],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{cc} could not run: {e}") from e
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: another process may be building the same file
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_TYPES[a] for a in args]
        fn.restype = _TYPES[result] if result else None
    if lib.fermi_layout() != PANEL:
        raise RuntimeError(f"{path} has another weight layout")
    sizes = (ctypes.sizeof(Stack) * 1000 + ctypes.sizeof(Layer)) * 1000 + ctypes.sizeof(Weight)
    if lib.fermi_stack_size() != sizes:
        raise RuntimeError(f"{path}'s structures do not match fermi.native's")
    return lib


def library(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (logged once, with why)."""
    key = " ".join(flags)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        lib = None
        setting = os.environ.get("FERMI_NATIVE", "1").strip()
        if setting not in ("0", "1"):  # ("false" or "off" would have left them on)
            raise ValueError(f"FERMI_NATIVE must be 0 or 1, got {setting!r}")
        if setting == "0":
            log.info("fermi's CPU kernels are off (FERMI_NATIVE=0)")
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            log.info("fermi's CPU kernels are x86 only; using torch's kernels")
        else:
            try:
                lib = load(build(flags))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                log.warning("fermi's CPU kernels are unavailable, using torch's: %s", e)
        _loaded[key] = lib
        return lib


def available() -> bool:
    return library() is not None


class NativeWeight:
    """A weight [n, k] in the panels of one of kernels.c's formats, with its bias: what a
    linear layer hands the kernels. ``codes``, ``scales`` and ``mins`` are the format's
    tensors (CPU, contiguous; see kernels.c); the caller keeps them (as buffers) and this
    object refers to them."""

    def __init__(
        self,
        fmt: str,
        n: int,
        k: int,
        codes,
        scales=None,
        mins=None,
        group: int = 0,
        bias=None,
    ) -> None:
        self.format, self.n, self.k, self.group = fmt, n, k, group
        self.codes, self.scales, self.mins, self.bias = codes, scales, mins, bias
        # (tensors moved off the CPU stay referred to; linear() refuses them)
        for t in (codes, scales, mins, bias):
            assert t is None or t.is_contiguous()

    @property
    def struct(self) -> Weight:
        """The structure, with the tensors' addresses as they are now: a tensor's storage
        can move under it (``Module.share_memory()`` frees the old one)."""
        scales, mins = self.scales, self.mins
        return Weight(
            self.codes.data_ptr(),
            None if scales is None else scales.data_ptr(),
            None if mins is None else mins.data_ptr(),
            self.group,
            FORMATS[self.format],
        )

    def __reduce__(self):
        # Copies (copy.deepcopy of a model) rebuild the structure around the copied tensors.
        args = (self.format, self.n, self.k, self.codes, self.scales, self.mins, self.group)
        return (NativeWeight, (*args, self.bias))

    def linear(self, x, norm_weight=None, eps: float = 1e-6, act: int = 0, residual=None):
        """``x`` [..., k] (``[gate | up]``, 2k, with ``act`` 1) times the weight, in one
        call: float32 out, ``norm_weight`` (an RMSNorm of ``x`` first), silu(gate) * up
        (``act`` 1) and ``residual`` (added) inside."""
        import torch

        width = self.k * (2 if act == 1 else 1)
        if x.shape[-1] != width:
            raise ValueError(f"expected {width} input features, got {x.shape[-1]}")
        tensors = (x, norm_weight, residual, self.codes)
        if any(t is not None and t.device.type != "cpu" for t in tensors):
            raise ValueError("fermi's CPU kernels take CPU tensors only (was the layer moved?)")
        x = x.to(torch.float32).contiguous()
        rows = x.numel() // width
        out = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        if residual is not None:
            residual = residual.to(torch.float32).expand(out.shape).contiguous()
        if norm_weight is not None:
            norm_weight = norm_weight.to(torch.float32).contiguous()
        lib = library()
        assert lib is not None, "a NativeWeight exists only where the kernels load"
        struct = self.struct
        code = lib.fermi_linear(
            ctypes.byref(struct),
            None if self.bias is None else self.bias.data_ptr(),
            self.n,
            self.k,
            x.data_ptr(),
            width,
            rows,
            None if norm_weight is None else norm_weight.data_ptr(),
            eps,
            act,
            None if residual is None else residual.data_ptr(),
            self.n,
            out.data_ptr(),
            self.n,
            torch.get_num_threads(),
        )
        if code == -2:
            raise ValueError(f"fermi's CPU kernels do not take this {self.format} weight")
        if code != 0:
            raise MemoryError("fermi's CPU kernel could not allocate its scratch rows")
        return out
