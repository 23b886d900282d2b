"""lrctl inside trainers: callbacks for Hugging Face transformers and Lightning.

Each is an optional extra (``pip install 'lrctl[huggingface]'``, ``'lrctl[lightning]'``)
and is imported on its own: ``lrctl.integrations.huggingface``,
``lrctl.integrations.lightning``.
"""
