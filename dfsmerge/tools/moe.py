"""Mixture-of-experts assembly from dense models ("clown-car" MoEs), reading mergekit-moe's YAML unchanged.

The output takes the base model's embeddings, attention and norms, one expert per source model in every layer (the
source's MLP), and a router per layer whose rows are gate vectors computed from each expert's prompts:

- ``hidden``: the base model's hidden state entering each layer at the last token of every prompt (the model run
  in bfloat16, as mergekit does), averaged over prompts; minus the same for the negative prompts; unit norm.
- ``cheap_embed``: the normalised sum of the prompts' token embeddings (no forward pass), the same for every layer.
- ``random`` (standard normal) and ``uniform_random`` (``U(-1/sqrt(H), 1/sqrt(H))``, nn.Linear's init), drawn from
  a generator seeded with ``seed``, so reproducible.

Outputs: ``mixtral`` (Llama/Mistral sources), ``qwen`` (Qwen2-MoE, with exactly one shared expert; Qwen2/Llama/
Mistral sources) and ``qwen3`` (Qwen3-MoE, Qwen3 sources). Tensor names and layouts are those mergekit-moe 0.1.5
writes (Mixtral and Qwen3-MoE with fused ``experts.gate_up_proj`` / ``experts.down_proj``, Qwen2-MoE per expert),
which transformers 5 loads. Tensors are read one at a time; experts are assembled one layer at a time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dfsmerge.errors import ArchitectureError, ConfigError, OutputExistsError

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
ARCHITECTURES = {"mixtral": ("llama", "mistral"), "qwen": ("llama", "mistral", "qwen2"), "qwen3": ("qwen3",)}


class Expert(BaseModel):
    """One dense model used as the experts of every layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    """mergekit-moe's YAML (``MoEMergeConfig``), field for field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None


def load_moe_config(path_or_data: str | Path | dict[str, Any]) -> MoEConfig:
    """Parse and validate a mergekit-moe YAML (file or dict); checks that need no model files happen here.

    Raises:
        ConfigError: the first problem, naming the field, the value and the fix.
    """
    from dfsmerge.recipe.config import format_validation_error

    if isinstance(path_or_data, dict):
        data, src = path_or_data, "moe config"
    else:
        src = str(path_or_data)
        try:
            data = yaml.safe_load(Path(path_or_data).read_text())
        except OSError as e:
            raise ConfigError(f"moe config {src!r} cannot be read ({e.strerror}); check the path") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"moe config {src!r} is not valid YAML ({str(e).splitlines()[0]}); fix it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"moe config {src!r} is not a mapping; give base_model, experts and gate_mode")
    try:
        cfg = MoEConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=src)) from None
    _check(cfg)
    return cfg


def _check(cfg: MoEConfig) -> None:
    if cfg.gate_mode not in GATE_MODES:
        raise ConfigError(f"gate_mode={cfg.gate_mode!r} is unknown; use one of {', '.join(GATE_MODES)}")
    if cfg.experts_per_token < 1:
        raise ConfigError(f"experts_per_token={cfg.experts_per_token} must be >= 1")
    if len(cfg.experts) < cfg.experts_per_token:
        raise ConfigError(f"experts_per_token={cfg.experts_per_token} but only {len(cfg.experts)} experts are "
                          "given; add experts or lower experts_per_token")
    if cfg.architecture is not None and _arch_name(cfg.architecture) is None:
        raise ConfigError(f"architecture={cfg.architecture!r} is unknown; use mixtral, qwen (qwen2_moe) or qwen3 "
                          "(qwen3_moe)")
    if cfg.gate_mode in ("hidden", "cheap_embed"):
        for i, e in enumerate(cfg.experts):
            if not e.positive_prompts:
                raise ConfigError(f"experts[{i}].positive_prompts is empty but gate_mode={cfg.gate_mode!r} needs "
                                  "prompts; give each expert positive_prompts or use gate_mode: random")
        if len(cfg.experts) > 1:
            tup = [(tuple(e.positive_prompts or []), tuple(e.negative_prompts or [])) for e in cfg.experts]
            if all(t == tup[0] for t in tup[1:]):
                raise ConfigError("experts[*].positive_prompts/negative_prompts are identical for every expert, so "
                                  "the router cannot tell them apart; give each expert prompts of what it should get")
    shared = cfg.shared_experts or []
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        raise ConfigError("shared_experts: give prompts for every shared expert or for none")


def _arch_name(name: str) -> str | None:
    n = name.lower()
    for key, aliases in (("mixtral", ("mixtral",)), ("qwen3", ("qwen3", "qwen3_moe", "qwen3 moe")),
                         ("qwen", ("qwen", "qwen2", "qwen2_moe", "qwen moe"))):
        if n in aliases:
            return key
    return None


def _select_arch(cfg: MoEConfig, model_types: list[str]) -> str:
    shared = len(cfg.shared_experts or [])
    reasons = {}
    for arch in (["mixtral", "qwen", "qwen3"] if cfg.architecture is None else [_arch_name(cfg.architecture)]):
        if arch in ("mixtral", "qwen3") and shared:
            reasons[arch] = f"has no shared experts (shared_experts has {shared})"
        elif arch == "qwen" and shared != 1:
            reasons[arch] = f"needs exactly one shared expert (shared_experts has {shared})"
        elif arch == "qwen" and cfg.gate_mode != "random" and not cfg.shared_experts[0].positive_prompts:
            reasons[arch] = "needs prompts for its shared expert"
        elif len(set(model_types)) != 1:
            reasons[arch] = f"needs one family for all models (got {sorted(set(model_types))})"
        elif model_types[0] not in ARCHITECTURES[arch]:
            reasons[arch] = f"takes {', '.join(ARCHITECTURES[arch])} models (got {model_types[0]})"
        else:
            return arch
    why = "; ".join(f"{a} {r}" for a, r in reasons.items())
    raise ArchitectureError(f"architecture={cfg.architecture!r}: no MoE output fits these models ({why}); "
                            "change architecture or the models")


# ------------------------------------------------------------------------------------------------ gate vectors
def _tokenize(tokenizer, prompts: list[str]):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _cheap_embed(embed: torch.Tensor, tok, num_layers: int) -> torch.Tensor:
    h = embed.float()[tok["input_ids"]]  # (B, T, H): a one-hot row times the embedding, exactly
    summed = (h * tok["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)  # (1, H)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)  # (L, H)


def _hidden_last(model, tok) -> torch.Tensor:
    with torch.no_grad():
        out = model(**tok, output_hidden_states=True, return_dict=True)
    hs = torch.stack(out.hidden_states[:-1])[:, :, -1, :]  # (L, B, H): the input of each layer, last token
    return hs.sum(dim=1) / hs.shape[1]  # (L, H)


def gate_vectors(cfg: MoEConfig, experts: list[Expert], *, num_layers: int, hidden_size: int,
                 seed: int = 0) -> torch.Tensor:
    """Router rows for ``experts``: (num_layers, len(experts), hidden_size)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, len(experts), hidden_size)
    if cfg.gate_mode == "random":
        return torch.randn(shape, generator=gen)
    if cfg.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden_size)
        return torch.rand(shape, generator=gen) * 2 * scale - scale
    from dfsmerge.io import open_checkpoint, resolve_model_path
    from dfsmerge.io.tokenizer import load_tokenizer

    base_dir = resolve_model_path(cfg.base_model)
    tokenizer = load_tokenizer(base_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gate_mode == "cheap_embed":
        embed = open_checkpoint(base_dir).get_tensor("model.embed_tokens.weight")

        def vec(prompts):
            return _cheap_embed(embed, _tokenize(tokenizer, prompts), num_layers)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).eval()

        def vec(prompts):
            return _hidden_last(model, _tokenize(tokenizer, prompts))
    rows = []
    for e in experts:
        v = vec(e.positive_prompts)
        if e.negative_prompts:
            v -= vec(e.negative_prompts)
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(v)
    return torch.stack(rows, dim=0).permute(1, 0, 2)  # (E, L, H) -> (L, E, H)


# ------------------------------------------------------------------------------------------------ output
def _out_config(arch: str, base_dir: Path, cfg: MoEConfig, dtype: torch.dtype):
    import transformers

    base = transformers.AutoConfig.from_pretrained(str(base_dir))
    n = len(cfg.experts)
    if arch == "mixtral":
        if not isinstance(base, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base.max_position_embeddings
            base = mistral
        out = transformers.MixtralConfig(**base.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts, out.num_experts_per_tok, out.sliding_window = n, cfg.experts_per_token, None
    else:
        cls = transformers.Qwen2MoeConfig if arch == "qwen" else transformers.Qwen3MoeConfig
        out = cls(**base.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM" if arch == "qwen" else "Qwen3MoeForCausalLM"]
        out.num_experts, out.num_experts_per_tok = n, cfg.experts_per_token
        out.decoder_sparse_step, out.norm_topk_prob = 1, True
        out.moe_intermediate_size = out.intermediate_size
        if arch == "qwen":
            out.sliding_window, out.use_sliding_window = None, False
            out.shared_expert_intermediate_size = out.intermediate_size
    out.dtype = dtype
    return out


def build_moe(cfg: MoEConfig, out_dir: str | Path, *, seed: int = 0, allow_all_same: bool = False,
              force: bool = False, max_shard_size: int | str = "5GB", progress: bool = True,
              recipe_text: str | None = None) -> Path:
    """Assemble the MoE checkpoint described by ``cfg`` into ``out_dir`` (atomically).

    Args:
        seed: seeds the ``random`` / ``uniform_random`` gates and the experts' ``noise_scale`` noise.
        allow_all_same: allow every expert to be the same model (useful only before training).
        recipe_text: the YAML as written, kept in the model card and ``mergekit_moe_config.yml``.
    Returns:
        ``out_dir``.
    Raises:
        ConfigError, ArchitectureError, CheckpointError, OutputExistsError: before anything is written.
    """
    from dfsmerge.io import ShardedWriter, copy_tokenizer, open_checkpoint
    from dfsmerge.io.dtypes import canonical_dtype, dtype_name, torch_dtype

    _check(cfg)
    if Path(out_dir).exists() and not force:
        raise OutputExistsError(f"output {out_dir} already exists; choose another path or pass --force to replace it")
    shared = list(cfg.shared_experts or [])
    if not allow_all_same and len(cfg.experts) > 1 and \
            all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:]):
        raise ConfigError(f"experts[*].source_model is {cfg.experts[0].source_model!r} for every expert: the MoE "
                          "would compute what that model does at a higher cost; use different models (or "
                          "--allow-all-same if you will train it)")
    base = open_checkpoint(cfg.base_model, name="base_model")
    readers = {e.source_model: open_checkpoint(e.source_model, name=e.source_model) for e in cfg.experts + shared}
    types = [base.config.get("model_type")] + [readers[e.source_model].config.get("model_type")
                                               for e in cfg.experts + shared]
    arch = _select_arch(cfg, types)
    bc = base.config
    for e in cfg.experts + shared:
        ec = readers[e.source_model].config
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            if ec.get(key) != bc.get(key):
                raise ArchitectureError(f"expert {e.source_model!r} has {key}={ec.get(key)} but base_model "
                                        f"{cfg.base_model!r} has {bc.get(key)}; experts must share the base's shapes")
    if cfg.dtype is not None and canonical_dtype(cfg.dtype) not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype={cfg.dtype!r} is unknown; use float32, float16 or bfloat16")
    out_dtype = torch_dtype(cfg.dtype) or torch_dtype(dtype_name(bc.get("dtype") or bc.get("torch_dtype")
                                                                 or "float32"))
    layers, hidden = int(bc["num_hidden_layers"]), int(bc["hidden_size"])
    out_cfg = _out_config(arch, base.path, cfg, out_dtype)

    need = list(cfg.experts)
    if shared and (any(e.positive_prompts for e in shared) or cfg.gate_mode in ("random", "uniform_random")):
        need += shared
    gates = gate_vectors(cfg, need, num_layers=layers, hidden_size=hidden, seed=seed)  # (L, E + S, H)
    gen = torch.Generator().manual_seed(seed + 1)

    def expert_tensor(e: Expert, name: str) -> torch.Tensor:
        t = readers[e.source_model].get_tensor(name)
        if e.noise_scale is not None:
            t = t + torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * e.noise_scale
        if name.endswith("down_proj.weight") and e.residual_scale is not None:
            t = t * e.residual_scale
        return t

    from tqdm import tqdm

    with ShardedWriter(out_dir, force=force, max_shard_size=max_shard_size) as w:
        for name in tqdm(base.keys(), desc="moe: base tensors", disable=not progress):
            if ".mlp." not in name:
                w.add_tensor(name, base.get_tensor(name).to(out_dtype))
        if arch == "qwen":
            _qwen2_missing_biases(base, w, out_cfg, layers, out_dtype)
        for i in tqdm(range(layers), desc="moe: expert layers", disable=not progress):
            p = f"model.layers.{i}.mlp"
            if arch == "qwen":
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for k, e in enumerate(cfg.experts):
                        w.add_tensor(f"{p}.experts.{k}.{proj}.weight",
                                     expert_tensor(e, f"{p}.{proj}.weight").to(out_dtype))
                    w.add_tensor(f"{p}.shared_expert.{proj}.weight",
                                 expert_tensor(shared[0], f"{p}.{proj}.weight").to(out_dtype))
            else:
                gate_up = torch.stack([torch.cat([expert_tensor(e, f"{p}.gate_proj.weight"),
                                                  expert_tensor(e, f"{p}.up_proj.weight")], dim=0)
                                       for e in cfg.experts])  # (E, 2I, H)
                w.add_tensor(f"{p}.experts.gate_up_proj", gate_up.to(out_dtype).contiguous())
                down = torch.stack([expert_tensor(e, f"{p}.down_proj.weight") for e in cfg.experts])  # (E, H, I)
                w.add_tensor(f"{p}.experts.down_proj", down.to(out_dtype).contiguous())
            w.add_tensor(f"{p}.gate.weight", gates[i, : len(cfg.experts)].to(out_dtype).contiguous())  # (E, H)
            if arch == "qwen":
                w.add_tensor(f"{p}.shared_expert_gate.weight",
                             gates[i, len(cfg.experts):].to(out_dtype).contiguous())  # (1, H)
        w.write_json("config.json", out_cfg.to_dict())
        copy_tokenizer(base.path, w)
        text = recipe_text if recipe_text is not None else yaml.safe_dump(cfg.model_dump(exclude_none=True),
                                                                          sort_keys=False)
        w.write_text("mergekit_moe_config.yml", text)
        w.write_text("README.md", _card(cfg, arch, out_cfg, text))
    return Path(out_dir)


def _qwen2_missing_biases(base, w, out_cfg, layers: int, dtype: torch.dtype) -> None:
    """Qwen2-MoE's attention has q/k/v biases; a Llama/Mistral base gets zeros (as mergekit-moe does)."""
    head_dim = out_cfg.hidden_size // out_cfg.num_attention_heads
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.bias"
            if name not in base:
                heads = out_cfg.num_attention_heads if proj == "q_proj" else out_cfg.num_key_value_heads
                w.add_tensor(name, torch.zeros(heads * head_dim, dtype=dtype))


def _card(cfg: MoEConfig, arch: str, out_cfg, text: str) -> str:
    lines = ["---", "tags: [moe, merge, dfsmerge]", "---", "", "# Mixture of experts assembled by dfsmerge", "",
             f"Output architecture: `{out_cfg.architectures[0]}` ({len(cfg.experts)} experts, "
             f"{cfg.experts_per_token} per token{', 1 shared expert' if arch == 'qwen' else ''}); gate mode "
             f"`{cfg.gate_mode}`. Attention, norms and embeddings from `{cfg.base_model}`; expert k of every layer is "
             "the MLP of `experts[k].source_model`:", ""]
    lines += [f"- expert {k}: `{e.source_model}`" for k, e in enumerate(cfg.experts)]
    lines += [f"- shared expert: `{e.source_model}`" for e in (cfg.shared_experts or [])]
    lines += ["", "Recipe (mergekit-moe YAML; `dfsmerge moe` or `mergekit-moe` rebuilds it):", "", "```yaml",
              text.rstrip(), "```", ""]
    return "\n".join(lines)
