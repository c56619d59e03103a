"""What a registered model runs when served: onnxruntime and tokenizers only, no torch, no finetune-flows."""
