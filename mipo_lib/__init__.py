"""mipo_lib: the helper library of the MIPO workbook.

Mutual Information Preference Optimization: DPO on (response to the right prompt) > (response to another prompt),
which maximizes the mutual information between prompt and response. Modules follow the pipeline's one direction:
config -> models -> tasks -> generate/scoring -> pairs -> dpo -> evaluate -> stats -> plots, plus `mi` for the
closed forms taught in notebook 01 and `runner` for the papermill batch reproduction.
"""

from mipo_lib.config import PRESETS, Preset, get_preset
from mipo_lib.errors import MipoError

__all__ = ["PRESETS", "Preset", "get_preset", "MipoError"]
__version__ = "0.1.0"
