"""Multi-pair averaging (DiffSynth-Studio's advice, as one command).

Runs a pair method once per pair, on that pair alone, and averages the resulting LoRAs: the
exact mean of their deltas (ranks concatenated), then optionally SVD back to `average_rank`.
Targets: those of the pair method it runs (on FLUX: velocities, see that method).
"""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..network.lowrank import combine_exact, svd_rerank
from .base import DataSizes, Method, Stage


class PerPairAverage(Method):
    def __init__(self, job, inner: Method):
        if not inner.needs_pairs:
            raise UserError(f"per_pair_average needs a pair method (copier, addift, slider, differential), not {inner.name}")
        super().__init__(job)
        self.inner = inner
        self.name = f"{inner.name}+per_pair_average"
        self.needs_pairs = True
        self.unet_only = inner.unet_only
        self.groups: list[list[str]] = []

    def caption_keys(self):
        return self.inner.caption_keys()

    def check_inputs(self, model, data) -> None:
        self.inner.check_inputs(model, data)

    def stages(self, data: DataSizes) -> list[Stage]:
        out, self.groups = [], []
        for i in range(data.n_items):
            group = []
            one_pair = DataSizes(1, lambda items, i=i: data.epoch_steps([i]), data.difference_coverage)
            for st in self.inner.stages(one_pair):
                name = f"pair{i:03d}.{st.name}"
                out.append(dataclasses.replace(st, name=name, items=[i], save_as=None,
                                               keep_active=[f"pair{i:03d}.{k}" for k in st.keep_active]))
                group.append(name)
            self.groups.append(group)
        return out

    def finalize(self, results):
        per_pair = []
        for group in self.groups:
            sub = {name.split(".", 1)[1]: results[name] for name in group}
            per_pair.append(self.inner.finalize(sub))
        n = len(per_pair)
        base = next(iter(results.values())).base_weights()  # LoHa/LoKr/DoRA deltas need the layers
        if self.job.average_rank:
            return svd_rerank(per_pair, [1.0 / n] * n, self.job.average_rank, conv_rank=self.job.average_rank,
                              base=base)
        return combine_exact(per_pair, [1.0 / n] * n, base=base)

    def metadata(self):
        return {**self.inner.metadata(), "ss_training_method": self.name, "difflora_pairs_averaged": str(len(self.groups))}
