"""Progress bars with rate and ETA (tqdm); FEDCONDENSE_PROGRESS=0 silences them."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0):
    disable = os.environ.get("FEDCONDENSE_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, mininterval=2.0, initial=initial,
                dynamic_ncols=True, leave=False)
