"""The same feature in two SAEs, matched by decoder direction: the paper's claim 2 (consistent features across
sparsity levels and runs), and the synthetic benchmark's cross-seed consistency."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[len(a), len(b)]` cosines between the rows of `a` and `b`."""
    return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def abs_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[len(a), len(b)]` |cos| between the rows of `a` and `b`."""
    return cosines(a, b).abs()


def consistency(decoder_a: torch.Tensor, decoder_b: torch.Tensor) -> float:
    """Mean best-match |cos| between two decoders' directions, averaged over both directions of matching."""
    cos = abs_cosines(decoder_a, decoder_b)
    return float((cos.max(1).values.mean() + cos.max(0).values.mean()) / 2)


def match_share(decoder_a: torch.Tensor, decoder_b: torch.Tensor, match_cos: float, rows=None) -> float | None:
    """Share of `decoder_a`'s rows (those indexed by `rows`; all by default) whose direction has a match among
    `decoder_b`'s: a row of it at cosine ≥ `match_cos` (signed: a latent's activations are non-negative, so a flipped
    direction is another feature). None when no row is asked for."""
    a = decoder_a if rows is None else decoder_a[rows]
    if len(a) == 0:
        return None
    return float((cosines(a, decoder_b).max(1).values >= match_cos).float().mean())


def cores_overlap(cores: list[torch.Tensor], match_cos: float) -> list[float]:
    """For every ordered pair of cores (their encoder rows, e.g. two seeds' distilled cores), the share of the
    first's rows whose direction has a match in the second's (`match_share`): the first claim's consistency."""
    return [match_share(a, b, match_cos) for a, b in itertools.permutations(cores, 2)]


def matched_latents(first, second, match_cos: float) -> dict[str, float | None]:
    """The share of `first`'s core latents (its first `core_size`) and of its non-core latents whose decoder
    direction has a match in `second`'s decoder (`match_share`; a part `first` lacks: None). Models are
    `DMSAEModel`s."""
    decoder, other, c = first.W_dec.detach(), second.W_dec.detach(), first.config.core_size
    return {
        "core": match_share(decoder, other, match_cos, range(c)),
        "noncore": match_share(decoder, other, match_cos, range(c, len(decoder))),
    }


PARTS = ("core", "noncore")


def latent_matches(
    model: Callable[[int, int, str], object],
    initial: Callable[[object, int], object],
    seeds: list[int],
    ks: list[int],
    at_k: int,
    variants: list[str],
    match_cos: float,
) -> dict:
    """Claim 2 measured: per variant, the shares (`matched_latents`, core and non-core apart) of the smallest k's
    model's latents matched

    - `same_seed`: in the same seed's model at each larger k (one share per seed);
    - `initial`: in its own initialization (`initial(model, seed)`), which a seed's models share, so that what
      training leaves in place counts as matched in `same_seed` too: the part of it that says nothing of the features;
    - `other_seeds`: in every other seed's model at each larger k (one per ordered pair of seeds);

    and `across_seeds`: at `at_k`, each seed's model in every other seed's. `model(seed, k, variant)` gives a trained
    `DMSAEModel`."""
    model = functools.cache(model)
    (smallest, *larger), pairs = sorted(ks), list(itertools.permutations(seeds, 2))

    def shares(pairs_of_models) -> dict[str, list[float | None]]:
        matches = [matched_latents(a, b, match_cos) for a, b in pairs_of_models]
        return {part: [m[part] for m in matches] for part in PARTS}

    rows = {}
    for v in variants:
        rows[v] = {
            "same_seed": {f"k{k}": shares((model(s, smallest, v), model(s, k, v)) for s in seeds) for k in larger},
            "initial": shares((model(s, smallest, v), initial(model(s, smallest, v), s)) for s in seeds),
            "other_seeds": {f"k{k}": shares((model(x, smallest, v), model(y, k, v)) for x, y in pairs) for k in larger},
            "across_seeds": shares((model(x, at_k, v), model(y, at_k, v)) for x, y in pairs),
        }
    return {"from_k": smallest, "at_k": at_k, "match_cos": match_cos, "seeds": list(seeds), "variants": rows}
