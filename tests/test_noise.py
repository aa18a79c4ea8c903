"""Known third-party noise is dropped by name and text (slmtune.noise); other warnings from the same loggers stay."""

import os
import subprocess
import sys

CODE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
import slmtune
import bitsandbytes  # on an AVX512-BF16 CPU this tries a hub kernel and warns; AVX2-only CPUs skip it
ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline. Set trust_remote_code=True")
ops.warning("a real bitsandbytes warning")
logging.getLogger("kernels._internals.hf_hub").warning(
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because offline.")
"""


def test_bitsandbytes_hub_kernel_noise_is_dropped_and_real_warnings_stay():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env=os.environ | {"HF_HUB_OFFLINE": "1"})
    text = out.stdout + out.stderr
    assert "kernels-community" not in text and "trust_remote_code" not in text, text
    assert "bitsandbytes.backends.cpu.ops: a real bitsandbytes warning" in text
