"""Tests of the integrations with job frameworks."""
