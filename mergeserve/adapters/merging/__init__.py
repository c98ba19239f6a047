"""Static merge methods: many LoRA experts in, one LoRA adapter out.

Every method is a pure function `(experts, options) -> AdapterFactors`, declared beside
its code with the parameters it reads and their defaults (method.py); `METHODS` (table.py)
is every declaration, by name. The package:

    options.py   MergeOptions and PARAMS: each parameter's meaning and check, once
    method.py    MergeMethod (a declaration), MergeContext, the checks every merge passes
    exact.py     linear, task_arithmetic, cat, slerp, lines: exact in low-rank form
    dense.py     ties, dare_linear, dare_ties, pcb: dense per module, then SVD
    learned.py   regmean, regmean_pp, fisher, adamerging(_layer), evolutionary: from data
    table.py     METHODS, merge(), the static arms, the methods table of the README
    io.py        merge_dirs: PEFT dirs in, a PEFT dir out

Adding a method: write it in the module of its family and declare it there
(`@declared.method(...)`); the CLI, `mergeserve methods`, the README table and the
static arms follow from the declaration. Families:

* exact in low-rank form — `linear`, `task_arithmetic`, `cat`, `slerp`: the result is a
  linear combination of the experts' deltas, so it is built by rank concatenation (see
  `lowrank.py`) with no error, then optionally truncated to a rank by factored SVD.
  SLERP is exact too: its two coefficients per module need only ⟨Δ_0, Δ_1⟩ and the norms,
  which come from r×r Gram matrices.
* dense — `ties`, `dare_linear`, `dare_ties`, `pcb`: trimming, random dropping and sign election
  act on the entries of Δ = B A, which no factorization keeps. Each module is formed
  densely (one layer at a time, so memory stays at T·out·in), combined, and factored back
  by SVD to the requested rank (randomized for large matrices).

Conventions (where PEFT and mergekit differ, we follow mergekit and say so):

* `weights` default to 1 for every expert. `linear` divides by Σw (a weighted average);
  the others do not, and `scale` (λ) multiplies the result (task arithmetic's λ).
* TIES: each expert keeps its top-`density` entries by magnitude (per module, PEFT's
  `int(density·numel)`); the sign of every entry is elected from Σ wᵢ τ̂ᵢ ("total") or
  from Σ sign(τ̂ᵢ) ("frequency"); the agreeing entries are summed with their weights and,
  when `normalize` (on for `ties`), divided by the sum of the agreeing weights.
  PEFT elects the sign from the unweighted sum and divides by the agreeing *count*; the
  two agree whenever the weights are equal, which is what the tests check against PEFT.
* DARE: each entry is kept with probability `density` and rescaled by 1/density. The
  mask of a module is drawn from a generator seeded by (seed, module kind, layer), so a
  merge is reproducible and independent of processing order. `normalize` is off for both
  DARE methods (mergekit's defaults).
* PEFT's `add_weighted_adapter(combination_type="linear"|"ties"|"dare_*")` combines A
  and B separately, which is not a merge of the deltas (Σ√w B · Σ√w A has cross terms);
  its `cat` and `*_svd` variants are exact and are what ours are compared with.
* Default output rank: exact methods keep the exact rank Σ rᵢ; dense methods factor to
  the same Σ rᵢ budget (capped at min(out, in)). `rank` / `energy` truncate either.
"""

from mergeserve.adapters.lowrank import ProgressBar
from mergeserve.adapters.merging.io import merge_dirs
from mergeserve.adapters.merging.method import MergeContext, MergeMethod, PerExperts
from mergeserve.adapters.merging.options import PARAMS, MergeOptions, Param
from mergeserve.adapters.merging.table import (
    METHODS,
    MethodTable,
    merge,
    methods_markdown,
    static_arms,
)

__all__ = [
    "METHODS",
    "PARAMS",
    "MergeContext",
    "MergeMethod",
    "MergeOptions",
    "MethodTable",
    "Param",
    "PerExperts",
    "ProgressBar",
    "merge",
    "merge_dirs",
    "methods_markdown",
    "static_arms",
]
