"""Integrations with the field's other libraries: vLLM (serving) and PEFT (LoRA adapters)."""
