"""Kubernetes size quantities (``8Gi``, ``500M``, ``1.5Ti``): checked and turned into bytes, and byte
counts rounded up to whole GiB.

Pod sizes in a recipe (``trainer.memory``, ``trainer.scratch``) are rendered verbatim into Argo
templates; a typo there (``24GB``, ``big``) would only fail when Kubernetes rejects the pod, hours into a
run. :func:`quantity_bytes` makes it an error at recipe load instead. :func:`gib` states a size derived
from a byte count (workflows/tables.py sizes the pods' ``/tmp`` from the data they hold).
"""

from __future__ import annotations

import math
import re

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_FACTOR = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(value: object, what: str) -> int:
    """Bytes of a size quantity (``"64Gi"`` -> 68719476736); ``what`` names the setting in the error.

    Raises:
        ValueError: not a string of digits with an optional binary (Ki..Ei) or decimal (k..E) suffix, or
            zero.
    """
    m = _QUANTITY.match(value) if isinstance(value, str) else None
    if m is None or float(m.group(1)) == 0:
        raise ValueError(f"{what}: {value!r} is not a size; want a Kubernetes quantity above zero such as "
                         "'64Gi' or '500M' (binary Ki Mi Gi Ti, decimal k M G T)")
    return math.ceil(float(m.group(1)) * _FACTOR[m.group(2)])


def gib(nbytes: float) -> str:
    """``nbytes`` rounded up to whole GiB as a quantity (``20.48e9`` -> ``"20Gi"``)."""
    return f"{max(1, math.ceil(nbytes / 2**30))}Gi"
