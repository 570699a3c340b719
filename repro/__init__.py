"""normgrowth: norm growth and stability in localized sequential knowledge editing."""
__version__ = "0.1.0"
