"""Per-model adapters for diffusers pipelines (installed as ``sparsediff.pipelines``)."""
