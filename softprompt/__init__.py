"""softprompt: Prompt Tuning, P-Tuning and prefix tuning (P-Tuning v2) for Hugging Face backbones."""
from softprompt.config import PromptConfig
from softprompt.encoder import PromptEncoder
from softprompt.generate import decode, filter_logits
from softprompt.inject import prepend_prompt
from softprompt.io import load_prompt, save_prompt
from softprompt.model import PromptModel
from softprompt.prefix import PrefixModel
from softprompt.prefix_config import PrefixConfig
from softprompt.prefix_encoder import PREFIX_MODEL_TYPES, PrefixEncoder, PrefixGeometry, prefix_geometry
from softprompt.prefix_io import load_prefix, save_prefix
from softprompt.prompt import SoftPrompt
from softprompt.summary import count_parameters, trainable_summary

__all__ = [
    "PromptConfig", "SoftPrompt", "PromptEncoder", "prepend_prompt", "PromptModel", "save_prompt",
    "load_prompt", "trainable_summary", "count_parameters", "decode", "filter_logits",
    "PrefixConfig", "PrefixModel", "PrefixEncoder", "PrefixGeometry", "prefix_geometry",
    "PREFIX_MODEL_TYPES", "save_prefix", "load_prefix",
]
