"""VTAB-1k: the task registry, VTAB's label rules (pure NumPy) and the TFDS -> ordered-source converter.

`registry` and `labels` import no TensorFlow; `convert` imports TFDS inside the functions that read data.
"""

from convert.vtab.convert import VtabConfig, convert_task, convert_vtab, plan_task
from convert.vtab.labels import LABEL_RULES, derived_class_names, rederive_labels
from convert.vtab.registry import PROTOCOLS, TASKS, VTAB_V2_TASKS, VtabTask, get_task, vtab_label

__all__ = [
    "LABEL_RULES",
    "PROTOCOLS",
    "TASKS",
    "VTAB_V2_TASKS",
    "VtabConfig",
    "VtabTask",
    "convert_task",
    "convert_vtab",
    "derived_class_names",
    "get_task",
    "plan_task",
    "rederive_labels",
    "vtab_label",
]
