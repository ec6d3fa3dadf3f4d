"""The model: one decoder for every family (layers.py, attention.py, linear.py, scan.py), its config
(config.py), the families' config.json readers and presets (gemma, llama, mistral, qwen2, phi;
dispatch in families.py), the reward and LM heads on the shared trunk (heads.py, lm_logprobs.py),
LoRA (lora.py), Hugging Face import/export (hf.py, hf_config.py) and the llama2.c converter.
It knows logical axis names only: no meshes, optimizers or runs."""
