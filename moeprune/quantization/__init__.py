"""Quantization of kept experts: formats, widths, RTN/GPTQ, mixed precision."""
