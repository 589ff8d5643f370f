"""Tests of megalith.core.fp8."""
