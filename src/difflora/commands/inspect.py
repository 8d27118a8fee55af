"""`difflora inspect FILE`: what a LoRA file holds."""

from __future__ import annotations

import json
from collections import defaultdict

from ..models.plugin import FamilyPlugin
from ..models.registry import lora_owner
from ..network.adapters import module_shapes
from ..network.files import load_lora

def block_of(name: str, family: FamilyPlugin | None) -> str:
    """The module's block as its family names it; outside the blocks (or for no known family) its component."""
    block = family.lora_block(name) if family is not None else None
    if block is None:
        return name.split("_")[1] if name.startswith("lora_") else "other"
    return block


def _algorithm(cls, parts) -> str:
    """'LoHa', 'LoRA/LoCon+DoRA', 'LoKr (tucker)', ... for one module."""
    extras = cls.traits(module_shapes(parts))
    return cls.title + ("+DoRA" if "dora_scale" in parts else "") + (f" ({', '.join(extras)})" if extras else "")


def summarize(lora) -> dict:
    family = lora_owner(set(lora.module_names()), lora.metadata)
    blocks: dict[str, dict] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set(), "conv": 0,
                                                   "algos": set()})
    algos: dict[str, int] = defaultdict(int)
    for name in lora.module_names():
        cls, parts = lora.modules[name]
        rank, alpha = lora.rank_alpha(name)
        b = blocks[block_of(name, family)]
        b["modules"] += 1
        b["ranks"].add(rank)
        b["alphas"].add(alpha)
        algo = _algorithm(cls, parts)
        b["algos"].add(algo)
        algos[algo] += 1
        if cls.kernel(module_shapes(parts)) not in ((), None) or (
                cls.kernel(module_shapes(parts)) is None and cls.flat_shape(module_shapes(parts))[1] % 9 == 0
                and family is not None and family.is_kxk_conv(name)):
            b["conv"] += 1
    args = lora.metadata.get("ss_network_args")
    try:
        network_args = json.loads(args) if args else {}
    except ValueError:
        network_args = {}
    comps = defaultdict(int)
    for name in lora.module_names():
        comps[name.split("_")[1]] += 1
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in lora.tensors.values()})
    return {
        "file": lora.path,
        "format": lora.source_format,
        "algorithm": dict(algos),
        "network_module": lora.metadata.get("ss_network_module", "unknown"),
        "network_args": network_args if isinstance(network_args, dict) else {},
        "base_model_version": lora.metadata.get("ss_base_model_version", "unknown"),
        "model_family": family.title if family is not None else "unknown",
        "modules": dict(comps),
        "total_modules": len(lora.module_names()),
        "dtypes": dtypes,
        "blocks": {k: {"modules": v["modules"], "conv_kxk": v["conv"], "rank": sorted(v["ranks"]),
                       "alpha": sorted(v["alphas"]), "algorithm": sorted(v["algos"])}
                   for k, v in sorted(blocks.items())},
        "metadata": lora.metadata,
    }


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a LoRA file's metadata, modules and ranks",
                       description="Print metadata, base model version, module counts and rank/alpha per block.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--all-metadata", action="store_true", help="print every metadata key (long values included)")
    p.set_defaults(func=run)


def run(args) -> int:
    lora = load_lora(args.file)
    info = summarize(lora)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"file:               {info['file']}")
    print(f"format:             {info['format']}  dtypes: {', '.join(info['dtypes'])}")
    print("algorithm:          " + ", ".join(f"{k} x{v}" for k, v in sorted(info["algorithm"].items())))
    opts = {k: v for k, v in info["network_args"].items() if v is not None}
    print(f"network:            {info['network_module']}" + (
        "  " + " ".join(f"{k}={v}" for k, v in sorted(opts.items())) if opts else ""))
    print(f"base model version: {info['base_model_version']}")
    md = info["metadata"]
    if "ss_min_timestep" in md or "ss_training_method" in md:
        method = md.get("ss_training_method", "standard")
        window = f"{md.get('ss_min_timestep', '0')}-{md.get('ss_max_timestep', '1000')}"
        print(f"training:           {method}, {md.get('ss_steps', '?')} steps, timesteps {window}")
    print("modules:            " + ", ".join(f"{k}={v}" for k, v in sorted(info["modules"].items())) +
          f"  (total {info['total_modules']})")
    print("\nblock                              modules  conv3x3  rank       alpha")
    for name, b in info["blocks"].items():
        print(f"{name:<34} {b['modules']:>7}  {b['conv_kxk']:>7}  {','.join(map(str, b['rank'])):<10} "
              f"{','.join(f'{a:g}' for a in b['alpha'])}")
    if md:
        print("\nmetadata:")
        for k in sorted(md):
            v = md[k]
            if not args.all_metadata and len(v) > 100:
                v = v[:97] + "..."
            print(f"  {k} = {v}")
    return 0
