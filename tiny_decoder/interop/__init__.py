"""Models in and out of the ecosystem: the project's decoder as a Hugging Face ``LlamaForCausalLM`` /
``GPT2LMHeadModel`` and as llama2.c ``model.bin`` / ``.pt`` files, both ways, and the tokenizers that go with
them. Plain torch and file formats on top of ``model`` and ``data``: checkpoints are read and written by the
``export`` / ``convert`` tools."""
