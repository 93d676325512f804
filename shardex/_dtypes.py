"""The one dtype table: each element type under its names in torch, safetensors and ONNX."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import torch


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`, the spelling used in options and manifests."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class DType:
    torch: torch.dtype
    safetensors: str
    onnx: ir.DataType

    @property
    def name(self) -> str:
        return dtype_name(self.torch)

    @property
    def onnx_type(self) -> str:
        """The type string of ONNX op schemas and of ONNX Runtime's input metadata."""
        return f"tensor({self.onnx.name.lower()})"


# The element types shardex stores and computes in.
DTYPES = (
    DType(torch.float64, "F64", ir.DataType.DOUBLE),
    DType(torch.float32, "F32", ir.DataType.FLOAT),
    DType(torch.float16, "F16", ir.DataType.FLOAT16),
    DType(torch.bfloat16, "BF16", ir.DataType.BFLOAT16),
    DType(torch.int64, "I64", ir.DataType.INT64),
    DType(torch.int32, "I32", ir.DataType.INT32),
    DType(torch.int16, "I16", ir.DataType.INT16),
    DType(torch.int8, "I8", ir.DataType.INT8),
    DType(torch.uint8, "U8", ir.DataType.UINT8),
    DType(torch.bool, "BOOL", ir.DataType.BOOL),
)

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {d.safetensors: d.torch for d in DTYPES}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {d.torch: d.safetensors for d in DTYPES}
TORCH_TO_ONNX: dict[torch.dtype, ir.DataType] = {d.torch: d.onnx for d in DTYPES}
BY_NAME: dict[str, torch.dtype] = {d.name: d.torch for d in DTYPES}

# Bits per element of every dtype the safetensors format defines, those shardex cannot store
# (fp8/fp6/fp4 variants, unsigned wide integers, complex) included: a header is checked with
# them before shardex says which of its tensors it cannot handle.
SAFETENSORS_BITS: dict[str, int] = {
    **{d.safetensors: d.torch.itemsize * 8 for d in DTYPES},
    "U16": 16,
    "U32": 32,
    "U64": 64,
    "C64": 64,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
}

# dtypes ONNX Runtime's CPU provider cannot compute in: verification promotes them to float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def onnx_type_name(elem_type: int) -> str:
    """An ONNX element type as shardex spells dtypes (``float32``); others by their ONNX name."""
    data_type = ir.DataType(elem_type)
    return next((d.name for d in DTYPES if d.onnx == data_type), data_type.name.lower())


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Parse a user-given floating dtype ("float16", "bf16", torch.float16)."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
        dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be one of float32, float16, bfloat16 (or fp32/fp16/bf16), got {name!r}."
        )
    return dtype
