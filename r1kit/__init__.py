"""r1kit: DeepSeek-R1 end to end in PyTorch.

Stable public API:
    model, tokenizer = r1kit.load(path, dtype=..., device=...)
    r1kit.save(model, tokenizer, path)
    logits = model(input_ids)            # (batch, seq, vocab)
"""
__version__ = "0.1.0"


def load(path, dtype=None, device=None):
    """Load a Hugging Face folder (qwen2, llama, deepseek_v3) or an r1kit preset name."""
    from r1kit.model.hf import load as _load

    return _load(path, dtype=dtype, device=device)


def save(model, tokenizer, path, **kwargs):
    """Save model (+ tokenizer) as a Hugging Face folder, atomically."""
    from r1kit.model.hf import save as _save

    return _save(model, tokenizer, path, **kwargs)


__all__ = ["load", "save", "__version__"]
