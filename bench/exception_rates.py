"""How sparse is the residual? Exception and round-trip-fix rates of real (base, fine-tune) pairs.

For each pair, Δ is extracted as the engine does by default (bf16/fp16 inputs: stored in their dtype;
fp32: float32) and, for fp32 pairs, also from copies cast to bf16 and fp16; the manifest's counts are
printed with the Δ's size (stored + residual) relative to 4 bytes per element, the float32 Δ the
engine stored before.

    python bench/exception_rates.py --pair BASE FINETUNE [--pair …] [--label NAME …]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recycler.stages.extract import diff_checkpoints


def cast_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(f).items()}
        save_file(state, str(f), metadata={"format": "pt"})
    return dst


def measure(label: str, base: Path, tuned: Path, tmp: Path) -> list[dict]:
    rows = []
    f32 = diff_checkpoints(base, tuned, tmp / "f32", dtype="float32", max_relative_norm=10).manifest
    shutil.rmtree(tmp / "f32")
    variants = [("as is", base, tuned)]
    dtypes = {json.dumps(f32["sources"]["base"]["dtypes"])}
    if dtypes == {json.dumps(["F32"])}:
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            variants.append(
                (name, cast_copy(base, tmp / f"b-{name}", dt), cast_copy(tuned, tmp / f"t-{name}", dt))
            )
    for name, b, t in variants:
        out = tmp / f"d-{name.replace(' ', '')}"
        m = diff_checkpoints(b, t, out, max_relative_norm=10).manifest
        size = sum(v["size"] for k, v in m["files"].items() if k.endswith(".safetensors"))
        res = m["residual"]
        rows.append(
            {
                "source": label,
                "dtype": name if name != "as is" else m["dtype"],
                "elements": res["elements"],
                "relative_norm": round(m["relative_norms"].get("matrices", 0.0), 4),
                "exception_pct": round(100 * res["exception_rate"], 3),
                "roundtrip_fix_pct": round(100 * res["roundtrip_fixes"] / res["elements"], 4),
                "size_vs_float32_delta": round(size / (4 * res["elements"]), 3),  # the Δ stored before
            }
        )
        shutil.rmtree(out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pair", nargs=2, action="append", type=Path, required=True, metavar=("BASE", "FINETUNE")
    )
    ap.add_argument("--label", action="append", default=[])
    args = ap.parse_args()
    rows = []
    for i, (base, tuned) in enumerate(args.pair):
        label = args.label[i] if i < len(args.label) else tuned.name
        with tempfile.TemporaryDirectory(
            dir=tuned.parent.parent if tuned.parent.parent.exists() else None
        ) as d:
            rows += measure(label, base, tuned, Path(d))
    print("| source | dtype | elements | ‖Δ‖/‖m‖ | exceptions % | round-trip fixes % | Δ size ÷ float32 Δ |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['source']} | {r['dtype']} | {r['elements']:,} | {r['relative_norm']} | {r['exception_pct']} | "
            f"{r['roundtrip_fix_pct']} | {r['size_vs_float32_delta']} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
