"""Stand-in for `sgl_kernel.scalar_type`: SGLang's quantization modules read `scalar_types.<name>` at import time
to build tables; the values are only compared/stored, never used on the float32 CPU path."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScalarType:
    name: str
    size_bits: int = 0
    signed: bool = False
    bias: int = 0

    def __str__(self) -> str:
        return self.name


class _ScalarTypes:
    # the GPTQ/AWQ/Marlin/FP8/FP4 types SGLang names at import time (size in bits, signedness, bias)
    uint4 = ScalarType("uint4", 4, False)
    uint8 = ScalarType("uint8", 8, False)
    int4 = ScalarType("int4", 4, True)
    int8 = ScalarType("int8", 8, True)
    uint4b8 = ScalarType("uint4b8", 4, False, 8)
    uint8b128 = ScalarType("uint8b128", 8, False, 128)
    float8_e4m3fn = ScalarType("float8_e4m3fn", 8, True)
    float8_e5m2 = ScalarType("float8_e5m2", 8, True)
    float16_e8m7 = ScalarType("float16_e8m7", 16, True)
    float16_e5m10 = ScalarType("float16_e5m10", 16, True)
    float6_e3m2f = ScalarType("float6_e3m2f", 6, True)
    float4_e2m1f = ScalarType("float4_e2m1f", 4, True)
    float8_e8m0fnu = ScalarType("float8_e8m0fnu", 8, False)


scalar_types = _ScalarTypes()
