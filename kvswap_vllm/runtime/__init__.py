"""Engine-free runtimes (HF transformers): the quality reference and a fallback for offline use."""
