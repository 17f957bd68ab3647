"""The MXFP4 -> bf16 weight decode's PTX (`l1_gemm.FP4_BF16_LUT_PTX`), run through a small PTX
emulator on the CPU: every byte value and every scale byte against the reference decode (bitwise).
The GPU half (`tests/test_gemm_gpu.py::test_fp4_bf16_decoders_equal_on_gpu`) runs the real
instruction sequence against the previous decoder and the reference on the same inputs."""
from __future__ import annotations

import re
import struct

import torch

from mega_moe_layer.kernels import l1_gemm
from mega_moe_layer.kernels import reference as ref

M32 = 0xFFFFFFFF


def _bf16_to_float(h: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (h & 0xFFFF) << 16))[0]


def _float_to_bf16(v: float) -> int:
    """RNE float -> bf16 bits (the products here have <= 2 significant bits: exact in float32 or
    past bf16's range, then +-inf)."""
    if abs(v) >= 2.0 ** 128:
        return 0xFF80 if v < 0 else 0x7F80
    b = struct.unpack("<I", struct.pack("<f", v))[0]
    if (b & 0x7F800000) == 0x7F800000:            # inf / nan: keep
        return b >> 16
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result = byte (c >> 4i) & 7 of {b, a} (a = bytes
    0-3), or that byte's sign bit replicated when bit 3 of the selector nibble is set."""
    src = (a & M32) | ((b & M32) << 32)
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    out = 0
    for half in range(2):
        x, y, z = (_bf16_to_float(v >> (16 * half)) for v in (a, b, c))
        out |= _float_to_bf16(x * y + z) << (16 * half)
    return out


def emulate(ptx: str, inputs: dict) -> dict:
    """Run the straight-line PTX (mov / and / shr / shl / prmt / lop3 / fma.rn.bf16x2, 32-bit
    registers, $n operands) and return every register."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0) & M32

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        d, srcs = args[0], [val(t) for t in args[1:]]
        if op == "mov.b32":
            r = srcs[0]
        elif op == "and.b32":
            r = srcs[0] & srcs[1]
        elif op == "or.b32":
            r = srcs[0] | srcs[1]
        elif op == "shr.u32":
            r = srcs[0] >> srcs[1]
        elif op == "shl.b32":
            r = (srcs[0] << srcs[1]) & M32
        elif op == "prmt.b32":
            r = _prmt(*srcs)
        elif op == "lop3.b32":
            r = _lop3(*srcs)
        elif op == "fma.rn.bf16x2":
            r = _fma_bf16x2(*srcs)
        else:
            raise AssertionError(f"emulator: unsupported instruction {op!r}")
        regs[d] = r & M32
    return regs


def _reference_bits(byte: int, scale: int) -> tuple:
    """bf16 bits of (low nibble, high nibble) x 2**(scale - 127) (scale byte 0: the kernel's scale
    word is 0 there, so every value is a signed zero)."""
    s = _bf16_to_float(scale << 7)
    out = []
    for code in (byte & 0xF, byte >> 4):
        v = float(ref.e2m1_decode(torch.tensor([code], dtype=torch.uint8))[0])
        if code == 8:
            v = -0.0          # the sign of a zero code is kept (the reference's value is 0.0)
        out.append(_float_to_bf16(v * s + (-0.0)))
    return tuple(out)


def _old_ptx() -> str:
    """The previous decoder's PTX (`_fp4_pairs_bf16_asm`, verified on an H200), from its source."""
    import inspect
    src = inspect.getsource(getattr(l1_gemm._fp4_pairs_bf16_asm, "fn", l1_gemm._fp4_pairs_bf16_asm))
    return re.search(r'asm="""(.*?)"""', src, re.S).group(1)


def _check_decoder(ptx: str, scale_rows) -> int:
    checked = 0
    for scale_row in scale_rows:
        scales = [scale_row, (scale_row + 1) % 256, (scale_row + 2) % 256, (scale_row * 7 + 3) % 256]
        for b0 in range(0, 256, 4):
            data = [b0, b0 + 1, b0 + 2, b0 + 3]
            x = sum(v << (8 * i) for i, v in enumerate(data))
            s = sum(v << (8 * i) for i, v in enumerate(scales))
            r = emulate(ptx, {"$4": x, "$5": s})
            lo = [r["$0"] & 0xFFFF, r["$0"] >> 16, r["$1"] & 0xFFFF, r["$1"] >> 16]
            hi = [r["$2"] & 0xFFFF, r["$2"] >> 16, r["$3"] & 0xFFFF, r["$3"] >> 16]
            for i in range(4):
                want = _reference_bits(data[i], scales[i])
                assert (lo[i], hi[i]) == want, (f"byte {data[i]:#04x} scale {scales[i]}: got "
                                                f"{lo[i]:#06x} {hi[i]:#06x}, want {want[0]:#06x} {want[1]:#06x}")
                checked += 1
    return checked


def test_emulator_agrees_with_the_gpu_verified_decoder():
    """The emulator itself: the previous decoder (bitwise equal to the reference on the H200)
    comes out equal to the reference here too."""
    assert _check_decoder(_old_ptx(), [0, 1, 100, 127, 128, 200, 254, 255]) == 8 * 256


def test_fp4_bf16_decode_ptx_emulated():
    ptx = str(l1_gemm.FP4_BF16_LUT_PTX.value if hasattr(l1_gemm.FP4_BF16_LUT_PTX, "value")
              else l1_gemm.FP4_BF16_LUT_PTX)
    assert set(re.findall(r"^\s*([a-z0-9.]+)\s", ptx, re.M)) - {".reg"} <= {
        "mov.b32", "and.b32", "shr.u32", "shl.b32", "prmt.b32", "lop3.b32", "fma.rn.bf16x2"}
    body = [line.strip() for line in ptx.splitlines()
            if line.strip().endswith(";") and not line.strip().startswith((".reg", "mov."))]
    assert len(body) <= 23, f"{len(body)} instructions per 8 weights (besides constants)"
    checked = _check_decoder(ptx, list(range(0, 256, 4)) + [1, 126, 127, 128, 253, 254, 255])
    assert checked == 71 * 256
