"""The toy zoo: tiny Llama models trained on CPU in minutes, with a combined task that needs two experts.

Entry points: :func:`build_zoo`, :func:`load_zoo`, :func:`resolve_zoo_model` (``zoo:<name>`` references),
:func:`default_zoo_dir`.
"""

from dfsmerge.zoo.build import (
    SIZES,
    Zoo,
    ZooModel,
    ZooTask,
    build_zoo,
    default_zoo_dir,
    is_zoo,
    load_zoo,
    resolve_zoo_model,
)
from dfsmerge.zoo.tasks import COMBINED_TASK, TASKS, VOCAB

__all__ = ["COMBINED_TASK", "SIZES", "TASKS", "VOCAB", "Zoo", "ZooModel", "ZooTask", "build_zoo",
           "default_zoo_dir", "is_zoo", "load_zoo", "resolve_zoo_model"]
