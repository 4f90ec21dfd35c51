"""Which units to finetune under a parameter budget: each selection criterion picks (component, layer) units.

A unit is one block component in one block, (``ln1`` | ``mha`` | ``ln2`` | ``fc1`` | ``fc2``, layer). A budget
B is a fraction of the backbone's block parameters (the sum over every unit; the embedding and the head are
not counted): a selection trains at most ⌊B · Σ_units n_unit⌋ parameters of the blocks, plus the head (and what
`components.ALWAYS_TRAINED` names), which is outside the budget.

Greedy fill (`greedy`): the units are taken in the selector's order; a unit that would take the total above the
budget is skipped and the next one tried, until every unit was tried. The selectors (`order`):

- a criterion of `registry.CRITERIA`: its per-unit scores (the criteria job's ``criteria.csv``), the end of its
  scale chosen first as that registry declares it (`selection.oriented`); a unit it does not score (a LayerNorm
  for ``kappatune``) comes after every scored unit;
- ``random``: a uniformly random order of the units, drawn from a seeded generator (``numpy.random.
  default_rng(draw)``); one arm per draw, each draw the same order on every task and seed;
- ``last_k``: the common heuristic "train the last k blocks": every component of the top block, then of the
  block below, …, greedily filled (within a block in the order ``ln1 mha ln2 fc1 fc2``);
- ``attention_top``: MHA only, from the top block down.

Ties in a criterion's scores keep the units' canonical order: layer ascending, then ``ln1 mha ln2 fc1 fc2``.

Each (selector, budget[, draw]) is a finetuning arm named by `arm_name`, e.g. ``fisher_8.5pct`` or
``random_8.5pct_draw1``. Kept free of heavy imports at module level: Snakemake reads the names at every start.
"""

from __future__ import annotations

import math

from vitplasticity.errors import UserError
from vitplasticity.registry import CRITERIA

RANDOM = "random"
HEURISTICS = ("last_k", "attention_top")
# Every selector a budget arm may name, in the order tables list them.
SELECTORS = (*CRITERIA, RANDOM, *HEURISTICS)

Unit = tuple[str, int]


def arm_name(selector: str, budget: float, draw: int | None = None) -> str:
    """The arm of `selector` at budget fraction `budget`: ``<selector>_<percent>pct[_draw<draw>]``."""
    name = f"{selector}_{budget * 100:g}pct"
    return name if draw is None else f"{name}_draw{draw}"


def arms(selection: dict) -> dict[str, dict]:
    """The budget arms a config's ``selection`` section declares: name → {selector, budget[, draw]}, budgets in
    config order, then selectors in config order (``random`` once per draw, draws 0 … random_draws − 1)."""
    found = {}
    for budget in selection.get("budgets", []):
        for selector in selection.get("criteria", []):
            draws = range(selection["random_draws"]) if selector == RANDOM else [None]
            for draw in draws:
                spec = {"selector": selector, "budget": budget} | ({"draw": draw} if draw is not None else {})
                found[arm_name(selector, budget, draw)] = spec
    return found


def needs_scores(selector: str) -> bool:
    """Whether `selector` ranks by the criteria job's scores (so its runs take ``criteria.csv`` as input)."""
    return selector in CRITERIA


def check_selectors(names: list[str], where: str) -> None:
    """Every name must be a selector of `SELECTORS`; one `UserError` line naming the allowed ones otherwise."""
    unknown = [name for name in names if name not in SELECTORS]
    if unknown:
        raise UserError(f"config key '{where}': unknown selector(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(SELECTORS)}")


def canonical(units) -> list[Unit]:
    """`units` by layer ascending, then in the order ``ln1 mha ln2 fc1 fc2``."""
    from vitplasticity.components import BLOCK_COMPONENTS

    return sorted(units, key=lambda unit: (unit[1], BLOCK_COMPONENTS.index(unit[0])))


def order(selector: str, units, scores: dict[Unit, float] | None = None, draw: int | None = None) -> list[Unit]:
    """The units in the order `selector` takes them (the module docstring gives each selector's rule).

    `units`: every (component, layer) of the model; `scores`: the criterion's score per unit (a unit missing
    or NaN is unscored), for a criterion of `registry.CRITERIA` only; `draw`: the seed of ``random``.
    Raises UserError for an unknown selector, or a criterion that scores no unit.
    """
    units = canonical(units)
    if selector == RANDOM:
        import numpy as np

        return [units[i] for i in np.random.default_rng(draw).permutation(len(units))]
    if selector == "last_k":
        return sorted(units, key=lambda unit: -unit[1])  # stable: the canonical order within a block
    if selector == "attention_top":
        return sorted((unit for unit in units if unit[0] == "mha"), key=lambda unit: -unit[1])
    check_selectors([selector], "selection.criteria")
    import pandas as pd

    from vitplasticity.selection import oriented

    values = pd.Series([(scores or {}).get(unit, math.nan) for unit in units], dtype=float)
    turned = oriented(values, selector)
    if turned.isna().all():
        raise UserError(f"criterion '{selector}' scores no unit of this model; check the criteria job's table")
    return [units[i] for i in turned.sort_values(ascending=False, kind="stable").index]


def limit(budget: float, sizes: dict[Unit, int]) -> int:
    """The most block parameters a budget fraction allows: ⌊budget · Σ sizes⌋."""
    return math.floor(budget * sum(sizes.values()))


def allowance(spec: dict, sizes: dict[Unit, int]) -> int:
    """The most block parameters `spec` allows: its ``params`` count when it gives one, else `limit` of its
    ``budget`` fraction."""
    return int(spec["params"]) if "params" in spec else limit(spec["budget"], sizes)


def greedy(ordered: list[Unit], sizes: dict[Unit, int], allowed: int) -> list[Unit]:
    """The units of `ordered` taken in turn, each unless it would take the total above `allowed` parameters."""
    chosen, total = [], 0
    for unit in ordered:
        if total + sizes[unit] <= allowed:
            chosen.append(unit)
            total += sizes[unit]
    return chosen


def select(spec: dict, sizes: dict[Unit, int], scores: dict[Unit, float] | None = None) -> list[Unit]:
    """The units a budget arm trains. `spec`: {selector, budget[, draw]} (`arms`), or {selector, params[, draw]}
    with the budget as a count of block parameters (`allowance`); `sizes`: parameter count per unit of the model
    (`unit_sizes`); `scores`: the selector's scores when it is a criterion (`unit_scores`). Raises UserError when
    the budget fits no unit (the arm would train the head alone)."""
    allowed = allowance(spec, sizes)
    ordered = order(spec["selector"], sizes, scores, spec.get("draw"))
    chosen = greedy(ordered, sizes, allowed)
    if not chosen:
        smallest = min(sizes[unit] for unit in ordered)
        if "params" in spec:
            raise UserError(f"selection budget of {allowed:,} block parameters is fewer than the smallest unit "
                            f"{spec['selector']} takes ({smallest:,}); raise the budget")
        raise UserError(f"selection budget {spec['budget']:g} allows {allowed:,} block parameters, fewer than the "
                        f"smallest unit {spec['selector']} takes ({smallest:,}); raise selection.budgets")
    return chosen


def unit_sizes(model) -> dict[Unit, int]:
    """Parameter count per unit of a timm ViT (`components.block_parameters`)."""
    from vitplasticity.components import block_parameters

    return {unit: sum(p.numel() for _, p in params) for unit, params in block_parameters(model).items()}


def unit_scores(table, criterion: str) -> dict[Unit, float]:
    """Per unit, the score of `criterion` in `table` (a frame with columns criterion, component, layer, value, as
    `criteria.measure` gives it and the criteria job writes it); empty when the table has none of it."""
    rows = table[table["criterion"] == criterion]
    return {(row.component, int(row.layer)): float(row.value) for row in rows.itertuples()}


def unit_label(unit: Unit) -> str:
    """``<component>.<layer>``, as run folders and tables name a unit."""
    return f"{unit[0]}.{unit[1]}"
