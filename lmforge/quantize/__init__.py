"""Post-training quantization (`lmforge quantize`) and perplexity (`lmforge eval`).

calib.py (built-in text) -> layerwise.py (HF model, one decoder layer at a time) -> gptq.py / awq.py / qparams.py
(the algorithms) -> writer.py + packing.py (standard formats); evaluate.py scores any checkpoint through
lmforge's own model; dequantize.py makes a dense copy of a quantized one.
"""
