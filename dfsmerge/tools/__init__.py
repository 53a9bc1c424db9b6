"""Stand-alone builders beside the search: a mixture of experts from dense models (:mod:`~dfsmerge.tools.moe`,
``dfsmerge moe``) and a fine-tune's difference as a LoRA adapter (:mod:`~dfsmerge.tools.lora`,
``dfsmerge extract-lora``)."""
