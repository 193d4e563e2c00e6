"""bitsandbytes int8 (`Linear8bitLt`) and NF4 (`Linear4bit`) layers for the bnb-int8 / bnb-nf4 methods.

    raygpt quantize configs/demo.yaml quantize.methods=[bnb-int8,bnb-nf4]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def bitsandbytes() -> Any:
    """bitsandbytes, with its per-call "inputs will be cast to float16" warning (fp32 inputs to int8 layers, expected
    here, logged on every matmul: thousands of lines per evaluation) silenced."""
    import logging

    import bitsandbytes

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def bnb_linear(linear: nn.Linear, method: str) -> nn.Module:
    bnb = bitsandbytes()

    has_bias = linear.bias is not None
    if method == "bnb-int8":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=torch.float32,
                                   quant_type="nf4")
    module.load_state_dict(linear.state_dict())
    return module.to("cpu")  # bitsandbytes quantizes when the module is moved to its device
