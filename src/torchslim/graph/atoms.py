"""Atoms: one id per channel of every prunable axis, joined by a union-find into coupled units.

Each layer axis that has channels (a conv's output filters, a Linear's input features, a
BatchNorm's entries, an attention block's heads) gets one atom per index. Tracing joins the atoms
that must be removed together (a conv's output channel i, the BatchNorm entry i after it, the
input channel i of every consumer, the same channel of a residual partner); a connected set is a
*unit*, the thing a pruner removes. Atoms that reach something we cannot follow (the model's
input or output, an op we have no rule for) are joined to the `BLOCKED` atom and never removed.
Pure bookkeeping: no torch here, so the coupling logic is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BLOCKED", "AtomTable", "Member"]

BLOCKED = 0


@dataclass(frozen=True)
class Member:
    """Index `index` of axis `axis` of the submodule `module` (e.g. `("conv1", "out", 3)`)."""

    module: str
    axis: str
    index: int


class AtomTable:
    """Atoms per (module, axis), a union-find over them, and why atoms were blocked."""

    def __init__(self) -> None:
        self._parent: list[int] = [BLOCKED]
        self._owner: list[Member | None] = [None]
        self._axes: dict[tuple[str, str], np.ndarray] = {}
        self.producing: set[tuple[str, str]] = set()
        self.reasons: list[str] = []

    def axis(self, module: str, axis: str, size: int, *, produces: bool) -> np.ndarray:
        """The atoms of `module`'s `axis` (made on first use, the same ones on every later call)."""
        key = (module, axis)
        if key not in self._axes:
            start = len(self._parent)
            self._parent.extend(range(start, start + size))
            self._owner.extend(Member(module, axis, i) for i in range(size))
            self._axes[key] = np.arange(start, start + size)
            if produces:
                self.producing.add(key)
        atoms = self._axes[key]
        if len(atoms) != size:
            raise ValueError(f"{module}.{axis} was seen with {len(atoms)} and {size} channels")
        return atoms

    def axes(self) -> dict[tuple[str, str], np.ndarray]:
        return dict(self._axes)

    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:  # path compression
            parent[atom], atom = root, parent[atom]
        return root

    def union(self, left: np.ndarray, right: np.ndarray) -> None:
        """Join `left[i]` with `right[i]` for every i (equal lengths)."""
        if len(left) != len(right):
            raise ValueError(f"cannot couple {len(left)} channels with {len(right)}")
        for a, b in zip(left.tolist(), right.tolist(), strict=True):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:  # BLOCKED (0) stays a root: the smaller id wins
                self._parent[max(ra, rb)] = min(ra, rb)

    def block(self, atoms: np.ndarray, reason: str) -> None:
        """Never remove `atoms` (nor anything coupled to them); `reason` is reported."""
        if len(atoms) and any(self.find(a) != BLOCKED for a in atoms.tolist()):
            self.reasons.append(reason)
        self.union(atoms, np.full(len(atoms), BLOCKED))

    def units(self) -> list[list[Member]]:
        """The removable units: coupled sets holding a producing axis and no blocked atom."""
        components: dict[int, list[Member]] = {}
        for atom in range(1, len(self._parent)):
            root = self.find(atom)
            if root != BLOCKED:
                owner = self._owner[atom]
                assert owner is not None
                components.setdefault(root, []).append(owner)
        return [members for members in components.values()
                if any((m.module, m.axis) in self.producing for m in members)]
