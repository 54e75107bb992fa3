"""The scale table: which token maps VAR predicts, in which order, and which phi refines each.

Pure Python so that training, export and the torch-free runtime all read the same facts.
"""

from __future__ import annotations

from fractions import Fraction

#: The official VAR scales for 256 px images (16x16 latent): L = 680 tokens.
PATCH_NUMS_256: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def scale_lengths(patch_nums: tuple[int, ...]) -> tuple[int, ...]:
    """Tokens per scale: pn * pn."""
    return tuple(pn * pn for pn in patch_nums)


def begin_ends(patch_nums: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Half-open token ranges of each scale in the flattened sequence of L tokens."""
    out, cur = [], 0
    for n in scale_lengths(patch_nums):
        out.append((cur, cur + n))
        cur += n
    return tuple(out)


def prefix_ends(patch_nums: tuple[int, ...]) -> tuple[int, ...]:
    """Tokens in the first k scales, for k = 1 .. K: where an early-centric prefix ends."""
    return tuple(e for _, e in begin_ends(patch_nums))


def total_tokens(patch_nums: tuple[int, ...]) -> int:
    """L, the length of the whole token pyramid."""
    return sum(scale_lengths(patch_nums))


def phi_table(num_scales: int, num_phi: int = 4) -> tuple[int, ...]:
    """Index of the phi conv that refines each scale when ``num_phi`` convs are shared.

    The official rule picks the phi whose tick (``linspace(1/3K, 1-1/3K, K)`` for K = 4, else
    ``linspace(1/2K, 1-1/2K, K)``) is nearest to ``k / (num_scales - 1)``. For ten scales two of
    those distances tie exactly; the official float arithmetic resolves both toward the later
    phi, giving (0,0,1,1,1,2,2,3,3,3). We compute in exact rationals and break ties the same way.
    """
    if num_scales < 2 or num_phi < 1:
        raise ValueError(f"phi_table needs >= 2 scales and >= 1 phi, got {num_scales} and {num_phi}")
    margin = Fraction(1, 3 * num_phi) if num_phi == 4 else Fraction(1, 2 * num_phi)
    step = (1 - 2 * margin) / (num_phi - 1) if num_phi > 1 else Fraction(0)
    ticks = [margin + i * step for i in range(num_phi)]
    table = []
    for k in range(num_scales):
        at = Fraction(k, num_scales - 1)
        dist = [abs(t - at) for t in ticks]
        best = min(dist)
        table.append(max(i for i, d in enumerate(dist) if d == best))
    return tuple(table)
