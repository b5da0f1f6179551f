"""``cdelta compare``: every refusal-editing method on one model and category, one table."""

from cdelta.compare.base import METHOD_PACKAGE, Method, MethodContext, MethodResult, available_methods, get_method

__all__ = ["METHOD_PACKAGE", "Method", "MethodContext", "MethodResult", "available_methods", "get_method"]
