"""Our kernels inside other libraries' models.

Each integration imports only `mmgpt_engine.ops` and the library it integrates with:
  integrations.transformers   apply_kernels(model) patches a loaded Hugging Face model in place
"""
