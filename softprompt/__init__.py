"""softprompt: Prompt Tuning and P-Tuning for Hugging Face backbones, through inputs_embeds."""
from softprompt.config import PromptConfig
from softprompt.encoder import PromptEncoder
from softprompt.generate import PromptInjection, generate_with_prompt
from softprompt.inject import prepend_prompt
from softprompt.io import load_prompt, save_prompt
from softprompt.model import PromptModel
from softprompt.prompt import SoftPrompt
from softprompt.summary import count_parameters, trainable_summary

__all__ = [
    "PromptConfig", "SoftPrompt", "PromptEncoder", "prepend_prompt", "PromptModel", "save_prompt",
    "load_prompt", "trainable_summary", "count_parameters", "PromptInjection",
    "generate_with_prompt",
]
