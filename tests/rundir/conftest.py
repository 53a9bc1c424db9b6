"""The run-directory tests reuse the search fixtures (tiny checkpoints, config builder, a multiple-choice task)."""

from tests.search.conftest import make_config, mc_task_dir, tiny_models  # noqa: F401
