"""Plasticity of pretrained vision-transformer components and what it says about finetuning."""

__version__ = "0.1.0"
