"""ADDifT with LoRA, LoHa, LoKr and DoRA at (about) equal parameter count on the eyes task, 8 pairs.

Runs `difflora eval --task eyes --pairs 8 --method addift-100` (ADDifT at 100 steps, lr 3e-3, 500-1000) once per adapter (the settings below;
everything else ADDifT's defaults), and measures each adapter's file: trainable parameters and the
size of the saved .safetensors (float32, kohya/LyCORIS metadata) on the embedded toy model's
U-Net targets. Writes bench/results/eval_adapters/<adapter>/eval.json (the eval's own output),
sizes.json and eval_adapters.md (the README table).

    nice -n 19 env OMP_NUM_THREADS=1 python bench/eval_adapters.py [--only lora,loha] [--sizes-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "eval_adapters"
# adapter -> job keys; ranks chosen for equal parameter count on the toy U-Net (LoRA rank 4: 118,272)
ADAPTERS = {
    "lora": {"network_algo": "lora", "network_dim": 4, "network_alpha": 4},
    "loha": {"network_algo": "loha", "network_dim": 2, "network_alpha": 2},
    "lokr": {"network_algo": "lokr", "network_dim": 8, "network_alpha": 8, "network_factor": 2},
    "dora": {"network_algo": "dora", "network_dim": 4, "network_alpha": 4},
}


def sizes(keys: dict) -> dict:
    """Trainable parameters and saved file size of ADDifT's network with these keys on the toy model."""
    from difflora.models import default_model_path, load_model
    from difflora.network.adapters import adapter_options
    from difflora.network.files import save_lora
    from difflora.network.lora import LoRANetwork, NetworkSpec
    from difflora.network.metadata import network_metadata

    model = load_model(default_model_path())
    opts = adapter_options(keys["network_algo"], factor=keys.get("network_factor", -1))
    spec = NetworkSpec(network_dim=keys["network_dim"], network_alpha=keys["network_alpha"], train_text_encoder=False,
                       adapter=opts)
    net = LoRANetwork.create(model.lora_targets(conv=False), spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        save_lora(net.kohya_state_dict(), path, {**model.lora_metadata(), **network_metadata(opts, None, None)})
        size = path.stat().st_size
    return {"parameters": sum(p.numel() for p in net.parameters()), "file_bytes": size, "modules": len(net.names)}


def table(rows: dict) -> str:
    lines = ["| adapter | settings | parameters | file | edit success | reverse | preservation | outside change | "
             "train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        e = r["eval"]
        settings = ", ".join(f"{k.replace('network_', '')}={v}" for k, v in ADAPTERS[name].items() if k != "network_algo")
        lines.append(f"| {name} | {settings} | {r['parameters']:,} | {r['file_bytes'] / 1024:.0f} KiB | "
                     f"{100 * e['edit_success']:.0f}% | {100 * e['reverse_success']:.0f}% | "
                     f"{100 * e['preservation']:.0f}% | {e['outside_change']:.4f} | {e['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ADAPTERS))
    p.add_argument("--sizes-only", action="store_true", help="measure files; use eval.json already written")
    args = p.parse_args()
    rows = {}
    for name in args.only.split(","):
        keys = ADAPTERS[name]
        out = OUT / name
        if not args.sizes_only:
            sets = [x for k, v in keys.items() for x in ("--set", f"{k}={json.dumps(v)}")]
            subprocess.run([sys.executable, "-m", "difflora", "eval", "--task", "eyes", "--pairs", "8", "--method",
                            "addift-100", *sets, "--out", str(out)], check=True)
        result = json.loads((out / "eval.json").read_text())[0]
        rows[name] = {**sizes(keys), "eval": result}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sizes.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "eval"}
                                                for k, v in rows.items()}, indent=2) + "\n")
    (OUT / "eval_adapters.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
