"""Chemistry metrics for SMILES predictions, with RDKit (``pip install 'capcli[chem]'``).

A prediction is compared with its reference as molecules, not strings: two SMILES of one
molecule written differently match once both are put in RDKit's canonical form.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Mapping, Sequence

CHEM_METRICS = ("valid", "canonical match", "canonical match (no stereo)", "tanimoto")


@functools.cache
def rdkit_available() -> bool:
    try:
        import rdkit  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _rdkit_quiet():
    """RDKit logs every SMILES it cannot parse to stderr; a model's invalid guesses are counted instead."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        yield
    finally:
        RDLogger.EnableLog("rdApp.*")


def _molecule(smiles: str):
    from rdkit import Chem

    return Chem.MolFromSmiles(smiles) if smiles.strip() else None


def valid_first(candidates: Sequence[str]) -> list[int]:
    """Indices of ``candidates`` (a beam's outputs, best first) with the SMILES RDKit can read first,
    each group in its own order: a reader should answer with a molecule when its beam holds one."""
    with _rdkit_quiet():
        valid = [_molecule(c) is not None for c in candidates]
    return sorted(range(len(candidates)), key=lambda i: not valid[i])


def chem_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Validity, canonical exact match with and without stereochemistry, and mean Tanimoto similarity
    (Morgan radius 2, 2048 bits) of each prediction against its first reference; an invalid
    prediction scores 0 on all of them."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    keys = sorted(candidates)
    if not keys:
        raise ValueError("no predictions to score")
    morgan = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    valid = exact = flat = tanimoto = 0.0
    with _rdkit_quiet():
        for k in keys:
            predicted, reference = _molecule(candidates[k]), _molecule(references[k][0])
            if predicted is None:
                continue
            valid += 1
            if reference is None:
                continue  # a reference RDKit cannot read: nothing to match
            exact += Chem.MolToSmiles(predicted) == Chem.MolToSmiles(reference)
            flat += Chem.MolToSmiles(predicted, isomericSmiles=False) == Chem.MolToSmiles(reference, isomericSmiles=False)
            tanimoto += DataStructs.TanimotoSimilarity(morgan.GetFingerprint(predicted), morgan.GetFingerprint(reference))
    n = len(keys)
    return {"valid": valid / n, "canonical match": exact / n, "canonical match (no stereo)": flat / n,
            "tanimoto": tanimoto / n}
