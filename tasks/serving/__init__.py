"""What a registered model runs when served: onnxruntime and tokenizers only, no torch, no finetune-flows.

Registration ships a copy of this folder inside every model version (``packaging.served_code_paths``),
where it is imported as the top-level package ``finetune_flows_serving``. So its modules import each
other only relatively and, from outside, only numpy, pandas, onnxruntime, tokenizers and mlflow
(with the pydantic that mlflow-skinny brings); their errors are in ``errors``.
"""
