"""Prompt tuning in peft's PROMPT_TUNING adapter format."""

from __future__ import annotations

from ...core.codec import PeftCodec, unsupported_unit
from ...errors import ConfigError, DeltaFileError
from .layer import PromptConfig, SoftPrompt


class PromptCodec(PeftCodec):
    """Prompt tuning: one table of virtual-token embeddings put before the input embeddings."""

    peft_type = "PROMPT_TUNING"
    prompt_learning = True
    understood = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                            "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                            "tokenizer_kwargs"})
    #: how the prompt started does not change the trained table peft loads
    exported_fields = frozenset({"num_virtual_tokens", "init", "init_token_ids", "init_text", "seed"})
    carried = ("num_virtual_tokens", "init_text")
    TABLE = "prompt_embeddings"

    def export_delta(self, config, sites, module_names):
        if len(sites) != 1 or not isinstance(sites[0][1], SoftPrompt):
            raise unsupported_unit(sites[0][1], sites[0][0], self.peft_type)
        table = sites[0][1].prompt
        fields = {
            "num_virtual_tokens": table.shape[0], "token_dim": table.shape[1],
            # deltatune prompts the encoder only; peft's seq2seq forward also uses only the first
            # num_virtual_tokens rows, so one submodule is the exact equivalent (and half the size)
            "num_transformer_submodules": 1,
            # the initialisation does not matter once the trained table is loaded; the text is kept for the record
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        }
        return fields, {self.TABLE: table}

    def import_delta(self, peft_config, tensors):
        rest = dict(tensors)
        if self.TABLE not in rest:
            raise DeltaFileError(f"the peft prompt-tuning adapter has no {self.TABLE!r} tensor")
        table = rest.pop(self.TABLE)
        tokens = int(peft_config.get("num_virtual_tokens") or 0)
        submodules = int(peft_config.get("num_transformer_submodules") or 1)
        if submodules not in (1, 2) or (submodules == 2 and peft_config.get("task_type") != "SEQ_2_SEQ_LM"):
            raise ConfigError(f"cannot import the peft prompt-tuning adapter: num_transformer_submodules={submodules} "
                              f"with task_type {peft_config.get('task_type')!r} is not supported")
        if tokens <= 0 or table.dim() != 2 or table.shape[0] != tokens * submodules:
            raise DeltaFileError(f"peft {self.TABLE} has shape {list(table.shape)}, but num_virtual_tokens={tokens} "
                                 f"x num_transformer_submodules={submodules} rows are expected")
        # peft's seq2seq forward puts only the first num_virtual_tokens rows before the encoder
        # input; the decoder half of a two-submodule table is never used in prompt tuning
        # the table is the adapter's own; init="vocab" only says how a fresh delta of this config
        # would start (without peft's tokenizer), and the text stays as peft's record
        config = PromptConfig(num_virtual_tokens=tokens, init="vocab",
                              init_text=peft_config.get("prompt_tuning_init_text"))
        return config, {"": {"prompt": table[:tokens].contiguous()}}, rest
