"""mergekit recipes: the merge config (:mod:`~dfsmerge.recipe.config`, mergekit 0.1.5's YAML as frozen pydantic
models) and its out-of-core executor (:mod:`~dfsmerge.recipe.executor`, ``dfsmerge merge``)."""
