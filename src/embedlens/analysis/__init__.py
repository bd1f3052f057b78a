"""Analyses over datasets: layer alignment of visual tokens and the injection-layer sweep."""
