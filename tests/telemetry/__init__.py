"""Tests of runestone.telemetry."""
