"""mipo_lib: the helper library of the MIPO workbook.

Mutual Information Preference Optimization: DPO on (response to the right prompt) > (response to another prompt),
which maximizes the mutual information between prompt and response. The core modules at the package root follow the
pipeline's one direction (tasks -> models -> generate/scoring -> pairs -> dpo -> evaluate, with `mi` for the closed
forms taught in notebook 01); `analysis/` (statistics, figures), `experiments/` (runs built on the core) and
`workbook/` (the notebooks' machinery) sit above it. Imports only go downward: docs/architecture.md.
"""

from mipo_lib.config import PRESETS, Preset, get_preset
from mipo_lib.errors import MipoError

__all__ = ["PRESETS", "Preset", "get_preset", "MipoError"]
__version__ = "0.1.0"
