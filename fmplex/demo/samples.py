"""Real inputs that ship inside installed packages (no download): the sample photographs of
scikit-learn (china.jpg, flower.jpg) and the time series bundled with statsmodels.

The files are read where the packages keep them, found with importlib's finder, so neither package
is imported (statsmodels would pull in pandas and scipy for a CSV file).

    sample_images() -> {"china": JPEG bytes, "flower": JPEG bytes}
    sample_series(name) -> float32 array (NaN where the dataset has a gap):
        co2        weekly CO2 at Mauna Loa, 1958-2001, ppm (2284 weeks, 59 missing)
        sunspots   yearly sunspot activity, 1700-2008
        elnino     monthly sea surface temperature, 1950-2010 (a single series, month order)
        nile       yearly flow of the Nile at Aswan, 1871-1970
        macrodata  quarterly US macro series, 1959-2009: realgdp, realcons, realinv, cpi (4, 203)
"""
from __future__ import annotations

import csv
import importlib.util
import os

import numpy as np

SERIES = {   # name -> (CSV inside statsmodels/datasets, columns to read)
    "co2": ("co2/co2.csv", ("co2",)),
    "sunspots": ("sunspots/sunspots.csv", ("SUNACTIVITY",)),
    "elnino": ("elnino/elnino.csv", ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP",
                                     "OCT", "NOV", "DEC")),
    "nile": ("nile/nile.csv", ("volume",)),
    "macrodata": ("macrodata/macrodata.csv", ("realgdp", "realcons", "realinv", "cpi")),
}


def package_file(package: str, relative: str) -> str:
    """A file inside an installed package, found without importing it (RuntimeError naming the
    package to install if it is missing)."""
    spec = importlib.util.find_spec(package)
    path = (os.path.join(list(spec.submodule_search_locations)[0], relative)
            if spec is not None and spec.submodule_search_locations else "")
    if not os.path.isfile(path):
        raise RuntimeError(f"{relative} ships with the package {package} (pip install {package})")
    return path


def sample_images() -> dict[str, bytes]:
    out = {}
    for name in ("china", "flower"):
        with open(package_file("sklearn", f"datasets/images/{name}.jpg"), "rb") as f:
            out[name] = f.read()
    return out


def sample_series(name: str) -> np.ndarray:
    relative, columns = SERIES[name]
    with open(package_file("statsmodels", f"datasets/{relative}"), newline="") as f:
        rows = list(csv.DictReader(f))
    table = np.array([[float(r[c]) if r[c].strip() else np.nan for c in columns] for r in rows],
                     np.float32)
    if name == "elnino":
        return table.reshape(-1)              # year by year, January to December
    return table[:, 0] if len(columns) == 1 else np.ascontiguousarray(table.T)
