"""Prompt distillation for CLIP (PromptKD): stored teacher class vectors, a prompted student, base-to-novel
evaluation, the `prompt_distill` job and its commands."""
