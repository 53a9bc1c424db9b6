"""The report tests reuse the search fixtures (tiny checkpoints, config builder)."""

from tests.search.conftest import make_config, mc_task_dir, tiny_models  # noqa: F401
