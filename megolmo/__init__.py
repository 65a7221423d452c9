"""megolmo: a Megatron-style 3D-parallel trainer for the OLMo 2 model family."""
