"""Aliases used in the public API's type hints (fastbp ships ``py.typed``).

``MatrixLike`` is what ``Sequential``'s X may be: an array-like, or a
scipy.sparse matrix or array.  Type checkers see the sparse types; at run
time the alias stays numpy's ``ArrayLike``, so ``import fastbp`` does not
import scipy.sparse (about 30 ms) for a hint.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Union

import numpy.typing as npt

ArrayLike = npt.ArrayLike
DTypeLike = npt.DTypeLike
#: a file name: str or an os.PathLike (pathlib.Path)
PathLike = Union[str, os.PathLike[str]]

if TYPE_CHECKING:
    from scipy.sparse import sparray, spmatrix

    MatrixLike = Union[npt.ArrayLike, spmatrix, sparray]
else:
    MatrixLike = npt.ArrayLike
