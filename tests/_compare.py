"""How tests compare our arrays with the reference's: relative error ‖a − b‖ / ‖b‖ in float64."""

import numpy as np


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
