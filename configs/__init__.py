"""recast's YAML configuration (defaults, edit and video profiles, prompt templates), shipped as package data."""
