"""twintune's LoReFT intervention against pyreft's own `LoreftIntervention`, on the same R, W and b.

    python -m benchmarks.loreft_pyreft [--wheels DIR]

pyreft 0.1.0 pins transformers 4.45.1, so it cannot be installed beside twintune's dependencies
(transformers 5). Its `interventions.py` only needs torch, transformers' ACT2FN and pyvene (whose
0.1.8 wheel imports under transformers 5), so this check downloads both wheels without their
dependencies (`pip download --no-deps`, or reads them from --wheels), unpacks them to a temporary
directory and imports pyreft's intervention module by path.

For a width d and rank r: a random trainable matrix gives twintune's R (rows orthonormalised by
Gram-Schmidt, as both backends do); pyreft's intervention is loaded with pyreft's own
`load_state_dict` from {"rotate_layer": Rᵀ, "weight": W, "bias": b} (its saved layout: the
rotation as columns), which asserts that its orthogonal parametrisation reproduces Rᵀ; then both
edit the same hidden states h: h + Rᵀ(W h + b − R h). Prints the largest difference relative to
the edit's scale, in float32 and float64; the check passes below 1e-6 and 1e-12.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def pyreft_interventions(wheels: Path):
    """pyreft's interventions module, imported from the wheels (pyvene on the path, pyreft's package
    __init__ skipped: it imports the trainer and data code this check does not need)."""
    for wheel in wheels.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(wheels / "unpacked")
    sys.path.insert(0, str(wheels / "unpacked"))
    spec = importlib.util.spec_from_file_location("pyreft_interventions", wheels / "unpacked" / "pyreft" / "interventions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(interventions, d: int, r: int, dtype) -> float:
    import torch

    from twintune.backends.torch.methods.loreft import LoReFT

    torch.manual_seed(0)
    ours = LoReFT(r, d, dtype, dropout=0.0, stream=0).to_empty(device="cpu")
    with torch.no_grad():
        ours.rotate_layer.copy_(torch.randn(r, d, dtype=dtype))
        ours.learned_source.weight.copy_(torch.randn(r, d, dtype=dtype) * 0.1)
        ours.learned_source.bias.copy_(torch.randn(r, dtype=dtype) * 0.1)
    ours.eval()
    from twintune.backends.torch.methods.loreft import orthonormal_rows

    R = orthonormal_rows(ours.rotate_layer.detach())
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # pyreft builds its rotation in the default dtype, whatever `dtype` says
    try:
        theirs = interventions.LoreftIntervention(embed_dim=d, low_rank_dimension=r, dtype=dtype)
        theirs.load_state_dict({"weight": ours.learned_source.weight.detach().clone(),
                                "bias": ours.learned_source.bias.detach().clone(), "rotate_layer": R.T.contiguous()})
    finally:
        torch.set_default_dtype(default)
    theirs.eval()
    h = torch.randn(4, 7, d, dtype=dtype)
    with torch.no_grad():
        mine, pyreft = ours.edit(h), theirs(h)
        return float((mine - pyreft).abs().max() / (mine - h).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=None, help="a directory holding the pyreft and pyvene wheels")
    args = parser.parse_args()
    wheels = args.wheels or Path(tempfile.mkdtemp(prefix="pyreft-"))
    if args.wheels is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                        "pyreft==0.1.0", "pyvene==0.1.8"], check=True)
    import torch

    interventions = pyreft_interventions(wheels)
    results = {"float32": compare(interventions, 64, 8, torch.float32), "float64": compare(interventions, 64, 8, torch.float64)}
    for dtype, bound in (("float32", 1e-6), ("float64", 1e-12)):
        verdict = "PASS" if results[dtype] < bound else "FAIL"
        print(f"{verdict}  LoReFT edit, twintune vs pyreft 0.1.0, d 64, r 8, {dtype}: max difference "
              f"{results[dtype]:.2e} of the edit's scale (bound {bound})")


if __name__ == "__main__":
    main()
