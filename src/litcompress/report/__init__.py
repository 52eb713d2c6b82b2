"""Reports on compressed models."""

from litcompress.report.sparsity import SparsityReport, TensorSparsity, sparsity_report, tensor_sparsity

__all__ = ["SparsityReport", "TensorSparsity", "sparsity_report", "tensor_sparsity"]
