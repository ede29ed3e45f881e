"""Figures and gathered reports of finished runs."""
